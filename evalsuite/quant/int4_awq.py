"""INT4 AWQ as Model Optimizer's awq_lite, wrapping the block INT4 weight quantizer.

Per projection, from calibration inputs x and weight W [out, in]:
  x̄ = per-input-channel mean |x| over calibration tokens;
  w̄ = per-input-channel mean over output rows of |W| / (its block's absmax);
  s(α) = x̄^α / w̄^(1-α), clamped to [1e-4, 1e4], divided by sqrt(max(s)·min(s));
  for α = 0, 0.1, ..., 1 the layer is evaluated as (x · p) · Q(W·s)ᵀ with the pre-quant scale
  p = 1/s, Q = block INT4 fake quantization, p, s and W·s in the model's dtype (as awq_lite
  computes them), and the α with the least mean squared error against x·Wᵀ is kept.
Two passes over the corpus: the first collects x̄, the second scores every α on the same inputs
(the model runs unquantized in both, as awq_lite does). The kept α's p = 1/s (float32) is the
projection's pre-quant scale: its weight becomes W / p in float32, rounded to the model's dtype,
and its input is multiplied by p (in the model's dtype) at run time, as Model Optimizer's
quantized model and the kernels that deploy it compute (x · p, not x / s: in BF16 the two differ
in the last bit of about a quarter of the values, which moved SmolLM2-135M's word perplexity by
0.5%; docs/RESULTS.md).

Then, by default (``resmooth=True``), the model takes the form Model Optimizer exports for
deployment (TensorRT-LLM, vLLM): projections that read one input share one pre-quant scale so
that they run as one GEMM and the scale can live in the norm before them.
  q, k, v (after input_layernorm) and gate, up (after the MLP's norm): with each one's
  pre-quant scale p_i (in the model's dtype, as Model Optimizer holds it), the group's p = mean_i
  p_i (in that dtype); each smoothed weight becomes W_i·p_i/p (computed in float32, rounded to the
  model's dtype; unchanged where p_i = p) and is quantized anew (block absmax); the norm's weight
  is multiplied by p (rounded to its dtype) and the projections keep no run-time input scaling
  (OLMo, with no norm before them: each multiplies its input by p at run time); o_proj and
  down_proj keep their own p, applied to their input at run time.
``resmooth=False`` keeps every projection's own p at run time: the model as calibrated, before
export. ``fp8_kv_cache`` adds static K and V scales from max calibration on the unquantized model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..engine.linear import linear, project
from ..engine.load import LoadedModel
from ..engine.model import CausalLM
from .api import handler
from .calibrate import cached, calibrate, projections, run_wrapped, shared_input_groups
from .configs import INT4_KERNEL_MODES, Int4AWQConfig
from .fp8 import FP8StaticQuantizer, kv_scale
from .int4 import Int4WeightOnlyLinear, int4_fake_quantize, pad_to_blocks

SCALE_MIN, SCALE_MAX = 1e-4, 1e4


def weight_channel_mean(w: Tensor, block_size: int) -> Tensor:
    """w̄: per input channel, mean over rows of |W| normalised by its block's absmax."""
    wp = pad_to_blocks(w.float().abs(), block_size)
    blocks = wp.view(wp.shape[0], -1, block_size)
    amax = blocks.amax(dim=-1, keepdim=True)
    normed = blocks / torch.where(amax > 0, amax, torch.ones_like(amax))
    return normed.view_as(wp)[:, :w.shape[1]].mean(dim=0)


def awq_scale(x_mean: Tensor, w_mean: Tensor, alpha: float) -> Tensor:
    s = (x_mean.float().pow(alpha) / w_mean.float().pow(1 - alpha)).clamp(SCALE_MIN, SCALE_MAX)
    return s / (s.max() * s.min()).sqrt()


def alphas(steps: int) -> list[float]:
    return [round(i / steps, 6) for i in range(steps + 1)]


class _MeanAbs(nn.Module):
    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner, self.total, self.count = inner, None, 0

    def forward(self, x: Tensor) -> Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        part = flat.abs().sum(dim=0)
        self.total = part if self.total is None else self.total + part
        self.count += flat.shape[0]
        return project(self.inner, x)


# The candidates' quantized weights (one copy of the model's projections per α) are kept between
# calibration batches up to this many bytes; past it (an 8B model: 11 x 16 GB) each batch
# quantizes them again, one at a time: the same numbers, in bounded memory.
KEEP_CANDIDATES_BYTES = 8 << 30


class _AlphaSearch(nn.Module):
    """Runs the exact layer and accumulates each candidate α's squared error on the side."""

    def __init__(self, inner: nn.Linear, x_mean: Tensor, block_size: int, grid: list[float], keep: bool):
        super().__init__()
        self.inner, self.grid, self.block_size = inner, grid, block_size
        w = inner.weight.detach()
        w_mean = weight_channel_mean(w, block_size)
        self.scales = [awq_scale(x_mean, w_mean, a) for a in grid]
        self.qweights = [self._candidate(s) for s in self.scales] if keep else None
        self.errors = [0.0] * len(grid)

    def _candidate(self, s: Tensor) -> Tensor:
        w = self.inner.weight.detach()
        return int4_fake_quantize(w * s.to(w.dtype)[None, :], self.block_size)

    def forward(self, x: Tensor) -> Tensor:
        ref = project(self.inner, x)
        for i, s in enumerate(self.scales):
            qw = self.qweights[i] if self.qweights is not None else self._candidate(s)
            out = linear(x * (1 / s).to(x.dtype), qw, self.inner.bias)
            self.errors[i] += float((out.float() - ref.float()).pow(2).sum())
        return ref


def search(lm: LoadedModel, sequences: list[list[int]], block_size: int, steps: int) -> dict[str, dict]:
    """Best α per projection, with its x̄ and the per-α errors (JSON-ready)."""
    model = lm.model
    means = run_wrapped(model, sequences, lambda linear, _name: _MeanAbs(linear))
    x_mean = {name: (m.total / max(m.count, 1)) for name, m in means.items()}
    grid = alphas(steps)
    weight_bytes = sum(getattr(parent, attr).weight.nbytes for parent, attr, _ in projections(model))
    keep = len(grid) * weight_bytes <= KEEP_CANDIDATES_BYTES
    searched = run_wrapped(model, sequences,
                           lambda linear, name: _AlphaSearch(linear, x_mean[name], block_size, grid, keep))
    out = {}
    for name, s in searched.items():
        best = min(range(len(grid)), key=lambda i: s.errors[i])
        out[name] = {"alpha": grid[best], "errors": s.errors, "x_mean": x_mean[name].tolist()}
    return out


def smoothed(model: CausalLM, pre: dict[str, Tensor], resmooth: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The AWQ-smoothed weights to quantize and the run-time pre-quant scales, by projection name,
    from the float32 pre-quant scales ``pre`` (p = 1/s), as Model Optimizer computes them (see the
    module docstring): each weight W / p rounded to its dtype, each p rounded to that dtype; with
    ``resmooth``, Model Optimizer's export: a shared-input group's weights resmoothed to the mean
    of their p, which is folded into the norm before them (in place), so the group keeps no
    run-time scale (or, where no norm precedes it, as OLMo's, each takes that mean)."""
    modules = dict(model.named_modules())
    weights, scales = {}, {}
    for name, p in pre.items():
        w = modules[name].weight.detach()
        weights[name] = (w.float() * (1.0 / p)[None, :]).to(w.dtype)
        scales[name] = p.to(w.dtype)
    if not resmooth:
        return weights, scales
    for norm, names in shared_input_groups(model):
        group = [scales.pop(n) for n in names]
        mean = torch.stack(group).mean(dim=0)
        for n, p in zip(names, group):
            if not torch.equal(p, mean):
                weights[n] = (weights[n].float() * p.float() / mean.float()).to(weights[n].dtype)
        if norm is None:
            scales.update({n: mean.clone() for n in names})  # one tensor each: saved apart
        else:
            norm.fold(lambda factor: factor * mean.float())
    return weights, scales


@handler(Int4AWQConfig)
def apply_int4(lm: LoadedModel, config: Int4AWQConfig) -> None:
    model = lm.model
    if model.config.modelopt == "W4A16_AWQ":  # published in this form: its codes as they are, on this device's path
        for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, Int4WeightOnlyLinear)]:
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, Int4WeightOnlyLinear(
                m.codes, m.scale, m.in_features, m.block_size, m.bias, m.pre_quant_scale, m.weight.dtype,
                use_kernel=config.kernel != "off", kernel_max_rows=INT4_KERNEL_MODES[config.kernel]))
        return
    # K and V scales from the model as it is, before any weight is quantized (max calibration)
    stats = calibrate(lm, config.calibration) if config.fp8_kv_cache else {}
    pre: dict[str, Tensor] = {}  # each projection's pre-quant scale p = 1/s, float32
    if config.awq:
        settings = {"block_size": config.block_size, "alpha_steps": config.alpha_steps}
        found = cached(lm, config.calibration, "awq-lite", settings,
                       lambda seqs: search(lm, seqs, config.block_size, config.alpha_steps))
        for parent, attr, name in projections(model):
            w_mean = weight_channel_mean(getattr(parent, attr).weight.detach(), config.block_size)
            f = found[name]
            pre[name] = 1.0 / awq_scale(torch.tensor(f["x_mean"], device=w_mean.device), w_mean, f["alpha"])
    weights, scales = smoothed(model, pre, config.awq and config.resmooth)
    for parent, attr, name in projections(model):
        setattr(parent, attr, Int4WeightOnlyLinear.from_linear(
            getattr(parent, attr), config.block_size, use_kernel=config.kernel != "off",
            kernel_max_rows=INT4_KERNEL_MODES[config.kernel], weight=weights.get(name),
            pre_quant_scale=scales.get(name)))
    if config.fp8_kv_cache:
        for i, layer in enumerate(model.model.layers):
            a, key = layer.self_attn, f"model.layers.{i}"
            a.k_cache_quant = FP8StaticQuantizer(kv_scale(stats[f"{key}.k_cache_quant"], "simulate"))
            a.v_cache_quant = FP8StaticQuantizer(kv_scale(stats[f"{key}.v_cache_quant"], "simulate"))
