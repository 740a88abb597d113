"""INT4 AWQ in AutoAWQ's form (``int4-awq-asym``): zero-point INT4, scales folded into the model.

Layer by layer, on inputs that the unquantized model produces (as AutoAWQ's quantizer runs it):

1. Scale search, per group of projections that share an input, scored on the output of the
   module that consumes them ("module2inspect"):
     q, k, v   after input_layernorm          scored on the attention block's output
     o         after v (only when v and o have the same shape, i.e. no grouped KV heads)
     gate, up  after the MLP's norm           scored on the MLP's output
     down      after up                       scored on down's output
   In a mixture of experts (AutoAWQ's Mixtral and Qwen3-MoE) the gate and up of every expert form
   one group, scored on the whole mixture's output, and each expert's down is a group of its own,
   on the tokens routed to it. The router is not among the scaled projections: once the scale is
   folded into the norm, it reads the norm's output divided by s with its weights unchanged, as in
   AutoAWQ's checkpoints. (A mixture with a shared expert, Qwen2-MoE, is refused:
   ``api.check_recipe_fits``.)
   x̄ = per-channel mean |x|; w̄ = per-channel mean over the group's rows of |W| / (its block's
   absmax + 1e-6); for ratio r = 0, 1/20, ..., 19/20: s = clamp(x̄^r / (w̄^(1-r) + 1e-4), min=1e-4),
   divided by sqrt(max(s)·min(s)); the weights become Q(W·s)/s and the s with the least mean
   squared output error is kept. Every search of a layer sees the layer's original weights.
2. The scales are folded: the norm's weight (or the preceding linear's rows) divided by s, the
   projections' input columns multiplied by s. No run-time input scaling is left.
3. Clip search for every projection but q and k (their errors pass through q·kᵀ): per output row
   and block, the clip max|w|·(1 - i/20) for i = 0..9 with the least mean squared error of that
   block's partial products on up to 512 calibration tokens (inputs divided by s as well).
4. Zero-point INT4 quantization, blocks of 128 (see ``int4``), with the block scales rounded to
   FP16 after the codes and zero points are found: AutoAWQ's GEMM form stores FP16 scales
   (``WQLinear_GEMM.from_linear``), which every AWQ kernel reads. from_linear recomputes the codes
   against them, round(((q - z)·s + z·s) / s16) = round(q·s / s16), which gives q back: for every
   scale above FP16's smallest normal value (6.1e-5) s16 is within a relative 2^-11 of s, and q ≤ 15.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..engine.config import MOE_ROUTERS
from ..engine.linear import project
from ..engine.load import LoadedModel
from ..engine.model import CausalLM, DecoderLayer, SparseMoE, Step
from .api import handler
from .calibrate import cached_tensors, token_batches
from .configs import INT4_KERNEL_MODES, Int4AutoAWQConfig
from .int4 import Int4WeightOnlyLinear, int4_asym_quantize, int4_fake_quantize, pad_to_blocks

SKIP_CLIP = ("q_proj", "k_proj")


def group_weight_mean(w: Tensor, block_size: int) -> Tensor:
    """w̄: per input channel, mean over rows of |W| / (block absmax + 1e-6) (AutoAWQ's form)."""
    wp = pad_to_blocks(w.float().abs(), block_size)
    blocks = wp.view(wp.shape[0], -1, block_size)
    normed = blocks / (blocks.amax(dim=-1, keepdim=True) + 1e-6)
    return normed.view_as(wp)[:, :w.shape[1]].mean(dim=0)


def duo_scale(x_mean: Tensor, w_mean: Tensor, ratio: float) -> Tensor:
    s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def search_scale(linears: list[nn.Linear], inputs: list[Tensor], forward, refs: list[Tensor], block_size: int,
                 n_grid: int) -> Tensor:
    """The best s for ``linears`` (one input), scored by ``forward(batch)`` against ``refs``."""
    x_mean = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).float().abs().mean(dim=0)
    originals = [m.weight.detach().clone() for m in linears]
    w_mean = group_weight_mean(torch.cat(originals), block_size)
    numel = sum(r.numel() for r in refs)
    best, best_err = torch.ones_like(x_mean), math.inf
    try:
        for i in range(n_grid):
            s = duo_scale(x_mean, w_mean, i / n_grid)
            for m, w in zip(linears, originals):
                m.weight.copy_(int4_fake_quantize(w.float() * s, block_size, asymmetric=True) / s)
            err = sum(float((forward(b).float() - r.float()).pow(2).sum()) for b, r in enumerate(refs)) / numel
            if err < best_err:
                best, best_err = s, err
    finally:
        for m, w in zip(linears, originals):
            m.weight.copy_(w)
    return best


def search_clip(w: Tensor, x: Tensor, block_size: int, grid: int, max_shrink: float, tokens: int) -> Tensor:
    """Per output row and block, the clip value max|w|·(1 - i/grid), i < max_shrink·grid, whose
    quantized block gives the least mean squared error of the block's partial products x_b·w_bᵀ."""
    x = x.reshape(-1, x.shape[-1]).float()
    x = x[::max(1, x.shape[0] // tokens)]
    w = w.float()
    out, blocks = w.shape[0], -(-w.shape[1] // block_size)
    xb = pad_to_blocks(x, block_size).view(x.shape[0], blocks, block_size).transpose(0, 1)  # [G, N, b]

    def partial(weight: Tensor) -> Tensor:  # [G, N, out]
        wb = pad_to_blocks(weight, block_size).view(out, blocks, block_size).permute(1, 2, 0)
        return torch.bmm(xb, wb)

    ref = partial(w)
    amax = pad_to_blocks(w.abs(), block_size).view(out, blocks, block_size).amax(dim=-1)  # [out, G]
    best, best_err = amax.clone(), torch.full_like(amax, math.inf)
    for i in range(int(max_shrink * grid)):
        limit = amax * (1 - i / grid)
        per_col = limit.repeat_interleave(block_size, dim=1)[:, :w.shape[1]]
        q = int4_fake_quantize(torch.clamp(w, -per_col, per_col), block_size, asymmetric=True)
        err = (partial(q) - ref).pow(2).mean(dim=1).t()  # [out, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, limit, best)
    return best


def _scale_groups(layer: DecoderLayer) -> list[tuple[str, nn.Module, list[str]]]:
    """(group name, the module whose output the scale multiplies, projections that read it). A
    mixture of experts (AutoAWQ's Mixtral and Qwen3-MoE): one scale for every expert's gate and
    up, which read the same norm, and each expert's down after its own up."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [("qkv", layer.input_layernorm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(("o", attn.v_proj, ["self_attn.o_proj"]))
    if isinstance(mlp, SparseMoE):
        experts = [f"mlp.experts.{e}" for e in range(len(mlp.experts))]
        groups.append(("mlp", layer.mlp_norm, [f"{x}.{p}" for x in experts for p in ("gate_proj", "up_proj")]))
        return groups + [(f"down.{e}", mlp.experts[e].up_proj, [f"{x}.down_proj"]) for e, x in enumerate(experts)]
    return groups + [("mlp", layer.mlp_norm, ["mlp.gate_proj", "mlp.up_proj"]),
                     ("down", mlp.up_proj, ["mlp.down_proj"])]


def projection_names(layer: DecoderLayer) -> list[str]:
    """The layer's projections that the recipe quantizes (a mixture's routers stay as they are)."""
    return [n for n, m in layer.named_modules() if type(m) is nn.Linear and n not in MOE_ROUTERS]


def put_modules(layer: DecoderLayer, modules: dict[str, nn.Module]) -> None:
    """Set each of the layer's submodules named in ``modules`` (dotted names within the layer)."""
    for n, m in modules.items():
        parent, attr = n.rsplit(".", 1)
        setattr(layer.get_submodule(parent), attr, m)


class _Recorder(nn.Module):
    """A projection that keeps every input it is called with."""

    def __init__(self, inner: nn.Module, sink: list[Tensor]):
        super().__init__()
        self.inner, self.sink = inner, sink

    def forward(self, x: Tensor) -> Tensor:
        self.sink.append(x)
        return project(self.inner, x)


@torch.inference_mode()
def search_layer(layer: DecoderLayer, batches: list[tuple[Tensor, Tensor, Tensor, Step]],
                 config: Int4AutoAWQConfig) -> dict[str, Tensor]:
    """Scales per group and clip values per projection for one layer (its weights are left as found)."""
    attn, mlp = layer.self_attn, layer.mlp
    # the inputs of o_proj and of each down_proj (and of each expert's gate, which its up shares:
    # only the tokens routed to it)
    recorded = [n for n in projection_names(layer) if n.endswith(("o_proj", "down_proj"))
                or (n.startswith("mlp.experts.") and n.endswith("gate_proj"))]
    seen: dict[str, list[Tensor]] = {n: [] for n in recorded}
    originals = {n: layer.get_submodule(n) for n in recorded}
    put_modules(layer, {n: _Recorder(m, seen[n]) for n, m in originals.items()})
    attn_in, attn_out, mlp_in, mlp_out = [], [], [], []
    try:
        for x, cos, sin, step in batches:
            attn_in.append(layer.attention_input(x))
            attn_out.append(attn(attn_in[-1], cos, sin, step))
            mlp_in.append(layer.mlp_input(layer.attention_residual(x, attn_out[-1])))
            mlp_out.append(mlp(mlp_in[-1]))
    finally:
        put_modules(layer, originals)

    def inputs_of(name: str) -> list[Tensor]:
        if name in seen:
            return seen[name]
        if name.startswith("mlp.experts."):  # up: its expert's gate's
            return seen[name.rsplit(".", 1)[0] + ".gate_proj"]
        return attn_in if name.startswith("self_attn.") else mlp_in

    def probe(group: str, names: list[str]):  # (inputs, forward(batch) with the current weights, reference outputs)
        if group == "qkv":
            return attn_in, lambda b: attn(attn_in[b], *batches[b][1:]), attn_out
        if group == "mlp":
            return mlp_in, lambda b: mlp(mlp_in[b]), mlp_out
        module, xs = layer.get_submodule(names[0]), seen[names[0]]  # o_proj or a down_proj
        return xs, lambda b: project(module, xs[b]), [project(module, x) for x in xs]

    result: dict[str, Tensor] = {}
    group_of: dict[str, str] = {}
    for group, _prev, names in _scale_groups(layer):
        xs, forward, refs = probe(group, names)
        linears = [layer.get_submodule(n) for n in names]
        if sum(x.numel() for x in xs):
            s = search_scale(linears, xs, forward, refs, config.block_size, config.n_grid)
        else:  # an expert no calibration token reached: nothing to weigh a scale by
            s = torch.ones(linears[0].weight.shape[1], dtype=torch.float32, device=linears[0].weight.device)
        result[f"{group}.scale"] = s
        group_of.update(dict.fromkeys(names, group))
    if config.clip:
        for name, w in _scaled_weights(layer, result).items():
            xs = inputs_of(name)
            if name.endswith(SKIP_CLIP) or not sum(x.numel() for x in xs):
                continue
            if name in group_of:  # the inputs the scaled weights see: divided by the group's s
                xs = [x.float() / result[f"{group_of[name]}.scale"] for x in xs]
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
            result[f"{name}.clip"] = search_clip(w, x, config.block_size, config.clip_grid, config.max_shrink,
                                                 config.clip_tokens)
    return result


def _scaled_weights(layer: DecoderLayer, found: dict[str, Tensor]) -> dict[str, Tensor]:
    """float32 copies of the layer's projection weights with the found scales applied (columns
    times s of their group, rows of a preceding linear divided by the next group's s)."""
    weights = {n: layer.get_submodule(n).weight.detach().float().clone() for n in projection_names(layer)}
    for group, prev, names in _scale_groups(layer):
        s = found[f"{group}.scale"]
        for n in names:
            weights[n] *= s[None, :]
        if isinstance(prev, nn.Linear):
            prev_name = next(n for n in weights if layer.get_submodule(n) is prev)
            weights[prev_name] /= s[:, None]
    return weights


def fold_scales(layer: DecoderLayer, found: dict[str, Tensor]) -> dict[str, Tensor]:
    """Divide the norms' weights, and the biases of preceding linears (v_proj's in Qwen1.5's
    attention, which has as many KV heads as query heads), by their group's s (in place), as
    AutoAWQ's scale_ln_fcs and scale_fc_fc do; return the projections' float32 weights with every
    scale applied. With those weights the layer computes what it did before."""
    for group, prev, _names in _scale_groups(layer):
        s = found[f"{group}.scale"]
        if not isinstance(prev, nn.Linear):
            prev.fold(lambda factor: factor / s)
        elif prev.bias is not None:
            prev.bias.copy_((prev.bias.float() / s).to(prev.bias.dtype))
    return _scaled_weights(layer, found)


def layer_batches(model: CausalLM, sequences: list[list[int]], max_batch_tokens: int = 4096):
    """The calibration batches as the first layer's inputs: (embeddings, cos, sin, step)."""
    out = []
    for b in token_batches(sequences, max_batch_tokens):
        step = Step.for_prefill([len(s) for s in b], device=model.device)
        tokens = torch.tensor([t for s in b for t in s], device=model.device).view(1, -1)
        out.append((model.embed(tokens), *model.rope(step), step))
    return out


@torch.inference_mode()
def search(model: CausalLM, sequences: list[list[int]], config: Int4AutoAWQConfig) -> dict[str, Tensor]:
    """Every layer's scales and clip values; layer i+1 sees the unquantized layer i's output."""
    batches = layer_batches(model, sequences)
    found: dict[str, Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        found.update({f"model.layers.{i}.{k}": v for k, v in search_layer(layer, batches, config).items()})
        batches = [(layer(x, cos, sin, step), cos, sin, step) for x, cos, sin, step in batches]
    return found


@handler(Int4AutoAWQConfig)
@torch.inference_mode()
def apply_autoawq(lm: LoadedModel, config: Int4AutoAWQConfig) -> None:
    model = lm.model
    if model.config.awq_group is not None:  # published in this form: its codes as they are, on this device's path
        for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, Int4WeightOnlyLinear)]:
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, Int4WeightOnlyLinear(
                m.codes, m.scale, m.in_features, m.block_size, m.bias, None, m.weight.dtype,
                use_kernel=config.kernel != "off", zero_point=m.zero_point,
                kernel_max_rows=INT4_KERNEL_MODES[config.kernel]))
        return
    settings = {k: v for k, v in config.__dict__.items() if k not in ("calibration", "kernel")}
    found = cached_tensors(lm, config.calibration, "autoawq", settings,
                           lambda seqs: search(model, seqs, config))
    for i, layer in enumerate(model.model.layers):
        mine = {k[len(f"model.layers.{i}."):]: v for k, v in found.items() if k.startswith(f"model.layers.{i}.")}
        for name, w in fold_scales(layer, mine).items():
            if f"{name}.clip" in mine:
                limit = mine[f"{name}.clip"].repeat_interleave(config.block_size, dim=1)[:, :w.shape[1]]
                w = torch.clamp(w, -limit, limit)
            linear = layer.get_submodule(name)
            parent, attr = name.rsplit(".", 1)
            setattr(layer.get_submodule(parent), attr, quantized_linear(w, linear.bias, linear.weight.dtype, config))


def quantized_linear(w: Tensor, bias: Tensor | None, dtype: torch.dtype,
                     config: Int4AutoAWQConfig) -> Int4WeightOnlyLinear:
    """The projection AutoAWQ's GEMM form holds for float32 weights ``w`` (scaled and clipped):
    zero-point codes and FP16 block scales (step 4 of the module's docstring)."""
    codes, scale, zero = int4_asym_quantize(w, config.block_size)
    return Int4WeightOnlyLinear(codes, scale.half().float(), w.shape[1], config.block_size,
                                None if bias is None else bias.detach(), None, dtype, use_kernel=config.kernel != "off",
                                zero_point=zero, kernel_max_rows=INT4_KERNEL_MODES[config.kernel])
