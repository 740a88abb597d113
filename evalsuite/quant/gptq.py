"""INT4 GPTQ in llm-compressor's W4A16 form (``int4-gptq``): what its ``GPTQModifier`` with the
W4A16 scheme computes, and what compressed-tensors' ``pack-quantized`` checkpoints hold (Red Hat's
*-quantized.w4a16 models, which vLLM serves).

Layer by layer, as llm-compressor's sequential pipeline runs it:

1. The layer runs its calibration inputs unquantized; every projection (each of a mixture's
   experts on the tokens routed to it) accumulates H = 2·Σ xᵀx over the sequences, divided by
   their number.
2. Each projection's group scales come from its weights alone, as compressed-tensors' memoryless
   min-max observer gives them: per output row and group of ``block_size`` inputs,
   max(|min(w, 0)|, max(w, 0)) / 7.5 in the model's dtype (an all-zero group: that dtype's eps).
   They stay fixed while GPTQ runs.
3. GPTQ (Frantar et al., 2022) in float32: with ``actorder`` the columns are taken in order of
   decreasing H diagonal (each keeps its group: the checkpoint holds no g_idx); a column whose H
   diagonal is 0 is zeroed; H is damped by ``dampening`` times its mean diagonal and replaced by
   the upper Cholesky factor of its inverse, U. Column j is rounded, code = round(clamp(w / s,
   -8, 7)), dequantized in the model's dtype, q = code·s; its error e = (w - q) / U[j, j] is taken
   from the columns after it in its block of ``gptq_block`` columns (w[:, k] -= e·U[j, k]), and each
   finished block's errors from every later column at once. Where H is not positive definite
   after damping the projection is rounded plainly (U = I), as llm-compressor falls back.
4. The layer's projections take their dequantized weights, and the layer's outputs on its inputs
   are the next layer's calibration inputs.

An expert that no calibration token reaches has no H: its weights are rounded plainly (U = I).
A projection whose inputs the groups do not tile (SmolLM2's 576 with 128) ends in a partial
group with its own scale; compressed-tensors' form needs whole groups (``api.hf_export_misfit``).
The product is the INT4 weight-only one of ``int4`` (codes and scales, the packed kernel where
the device has one): the dequantized weights in the model's dtype, as vLLM's Marlin kernels form
them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..engine.linear import project
from ..engine.load import LoadedModel
from ..engine.model import CausalLM, DecoderLayer
from .api import handler
from .calibrate import cached_tensors, check_published_scope
from .configs import INT4_KERNEL_MODES, Int4GPTQConfig
from .int4 import INT4_MAX, INT4_MIN, Int4WeightOnlyLinear, pad_to_blocks
from .int4_awq_asym import layer_batches, projection_names, put_modules

SYMMETRIC_DIVISOR = 7.5  # compressed-tensors' symmetric scale: absmax / ((q_max - q_min) / 2), 4 bits: 15 / 2


def group_scales(w: Tensor, block_size: int, divisor: float = SYMMETRIC_DIVISOR) -> Tensor:
    """Scales [out, groups] in w's dtype, as compressed-tensors' ``calculate_qparams`` makes them
    from each group's min and max (zero padding of a partial group changes neither): absmax over
    ``divisor``, half the code range (7.5 for 4 bits, 127.5 for 8)."""
    blocks = pad_to_blocks(w, block_size).view(w.shape[0], -1, block_size)
    absmax = torch.maximum(blocks.amin(dim=-1).clamp(max=0).abs(), blocks.amax(dim=-1).clamp(min=0))
    scale = absmax / torch.tensor(divisor, dtype=w.dtype, device=w.device)
    return torch.where(scale == 0, torch.finfo(w.dtype).eps, scale)


def _inverse_hessian_factor(h: Tensor, dampening: float) -> tuple[Tensor, Tensor]:
    """The upper Cholesky factor of the damped H's inverse, and the columns H says are dead
    (zero diagonal: set to 1 here, their weights zeroed by the caller). The identity where the
    damped H is not positive definite (plain rounding)."""
    h = h.clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    diag.add_(dampening * diag.mean())
    factor, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        return torch.eye(h.shape[0], dtype=h.dtype, device=h.device), dead
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True), dead


def gptq_codes(w: Tensor, hessian: Tensor | None, scale: Tensor, block_size: int, *, actorder: bool = True,
               dampening: float = 0.01, gptq_block: int = 128, code_range: tuple[int, int] = (INT4_MIN, INT4_MAX)
               ) -> Tensor:
    """GPTQ's codes [out, in] (int8 in ``code_range``, INT4's [-8, 7] by default) for weight ``w``
    with group scales ``scale`` (``group_scales``) and Hessian ``hessian`` [in, in] (None: plain
    rounding), as steps 2-3 of the module's docstring describe."""
    rows, cols = w.shape
    W = w.float().clone()
    group = torch.arange(cols, device=w.device) // block_size
    if hessian is None:
        hessian = torch.eye(cols, device=w.device)  # no statistics: every column its own, rounded plainly
    H = hessian.float()
    perm = None
    if actorder:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H, group = W[:, perm], H[perm][:, perm], group[perm]
    U, dead = _inverse_hessian_factor(H, dampening)
    W[:, dead] = 0
    codes = torch.empty(rows, cols, dtype=torch.int8, device=w.device)
    for i1 in range(0, cols, gptq_block):
        i2 = min(i1 + gptq_block, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        errors = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col, s = W1[:, i], scale[:, group[i1 + i]]
            code = torch.round(torch.clamp(col / s, *code_range))
            q = (code.to(s.dtype) * s).float()  # dequantized in the scale's (the model's) dtype
            err = (col - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            errors[:, i] = err
            codes[:, i1 + i] = code.to(torch.int8)
        W[:, i2:] -= errors @ U[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


class _HessianRecorder(nn.Module):
    """A projection that adds 2·xᵀx of every input it is called with to ``sums[name]``."""

    def __init__(self, inner: nn.Module, name: str, sums: dict[str, Tensor]):
        super().__init__()
        self.inner, self.name, self.sums = inner, name, sums

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        if flat.shape[0]:
            xs = flat * 2 ** 0.5
            self.sums[self.name] = self.sums[self.name] + xs.t() @ xs if self.name in self.sums else xs.t() @ xs
        return project(self.inner, x)


def layer_hessians(layer: DecoderLayer, names: list[str], batches, sequences: int) -> dict[str, Tensor]:
    """H of each named projection of ``layer`` over the calibration batches (the layer as it is)."""
    sums: dict[str, Tensor] = {}
    originals = {n: layer.get_submodule(n) for n in names}
    put_modules(layer, {n: _HessianRecorder(m, n, sums) for n, m in originals.items()})
    try:
        for x, cos, sin, step in batches:
            layer(x, cos, sin, step)
    finally:
        put_modules(layer, originals)
    return {n: h / sequences for n, h in sums.items()}


@torch.inference_mode()
def quantize_layers(model: CausalLM, sequences: list[list[int]], config: Int4GPTQConfig) -> dict[str, Tensor]:
    """Every projection's codes and scales (``<name>.codes``, ``<name>.scale``); layer i+1 is
    calibrated on the outputs of layer i quantized. The model's projections are left holding their
    dequantized weights."""
    batches = layer_batches(model, sequences)
    found: dict[str, Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        names = projection_names(layer)
        hessians = layer_hessians(layer, names, batches, len(sequences))
        for name in names:
            linear = layer.get_submodule(name)
            w = linear.weight.detach()
            scale = group_scales(w, config.block_size)
            codes = gptq_codes(w, hessians.get(name), scale, config.block_size, actorder=config.actorder,
                               dampening=config.dampening, gptq_block=config.gptq_block)
            found[f"model.layers.{i}.{name}.codes"], found[f"model.layers.{i}.{name}.scale"] = codes, scale
            linear.weight.copy_(_dequantized(codes, scale, config.block_size))
        batches = [(layer(x, cos, sin, step), cos, sin, step) for x, cos, sin, step in batches]
    return found


def _dequantized(codes: Tensor, scale: Tensor, block_size: int) -> Tensor:
    """code·s per weight, in the scale's dtype (the model's)."""
    per_column = scale.repeat_interleave(block_size, dim=1)[:, :codes.shape[1]]
    return codes.to(scale.dtype) * per_column


@handler(Int4GPTQConfig)
@torch.inference_mode()
def apply_gptq(lm: LoadedModel, config: Int4GPTQConfig) -> None:
    model = lm.model
    use_kernel, max_rows = config.kernel != "off", INT4_KERNEL_MODES[config.kernel]
    if model.config.compressed_int4 is not None:  # published in this form: its codes as they are, on this device's path
        check_published_scope(model, "int4-gptq", Int4WeightOnlyLinear, "INT4")
        for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, Int4WeightOnlyLinear)]:
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, Int4WeightOnlyLinear(
                m.codes, m.scale, m.in_features, m.block_size, m.bias, None, m.weight.dtype, use_kernel=use_kernel,
                kernel_max_rows=max_rows))
        return
    settings = {k: v for k, v in config.__dict__.items() if k not in ("calibration", "kernel")}
    found = cached_tensors(lm, config.calibration, "gptq", settings, lambda seqs: quantize_layers(model, seqs, config))
    for i, layer in enumerate(model.model.layers):
        for name in projection_names(layer):
            linear, key = layer.get_submodule(name), f"model.layers.{i}.{name}"
            codes, scale = found[f"{key}.codes"], found[f"{key}.scale"]
            parent, attr = name.rsplit(".", 1)
            setattr(layer.get_submodule(parent), attr, Int4WeightOnlyLinear(
                pad_to_blocks(codes, config.block_size), scale.float(), codes.shape[1], config.block_size,
                None if linear.bias is None else linear.bias.detach(), None, linear.weight.dtype,
                use_kernel=use_kernel, kernel_max_rows=max_rows))
