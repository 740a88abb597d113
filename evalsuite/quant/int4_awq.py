"""INT4 AWQ as Model Optimizer's awq_lite, wrapping the block INT4 weight quantizer.

Per projection, from calibration inputs x and weight W [out, in]:
  x̄ = per-input-channel mean |x| over calibration tokens;
  w̄ = per-input-channel mean over output rows of |W| / (its block's absmax);
  s(α) = x̄^α / w̄^(1-α), clamped to [1e-4, 1e4], divided by sqrt(max(s)·min(s));
  for α = 0, 0.1, ..., 1 the layer is evaluated as (x / s) · Q(W·s)ᵀ, Q = block INT4 fake
  quantization, and the α with the least mean squared error against x·Wᵀ is kept.
Two passes over the corpus: the first collects x̄, the second scores every α on the same inputs
(the model runs unquantized in both, as awq_lite does).

Then, by default (``resmooth=True``), the model takes the form Model Optimizer exports for
deployment (TensorRT-LLM, vLLM): projections that read one input share one pre-quant scale so
that they run as one GEMM and the scale can live in the norm before them.
  q, k, v (after input_layernorm) and gate, up (after the MLP's norm): with each one's
  pre-quant scale p_i = 1/s_i, the group's p = mean_i p_i; each smoothed weight W·s_i, stored in
  the model's dtype, becomes W·s_i·p_i/p (in the model's dtype, as Model Optimizer computes it;
  unchanged where p_i = p) and is quantized anew (block absmax); the norm's weight is multiplied
  by p (rounded to its dtype) and the projections keep no run-time input scaling (OLMo, with no
  norm before them: each scales its input by p at run time, as Model Optimizer's pre-quant scale);
  o_proj and down_proj keep their own s, applied to their input at run time.
``resmooth=False`` keeps every projection's own s at run time (x / s) and quantizes W·s in
float32: the model as calibrated, before export.
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
        return int4_fake_quantize(w.float() * s[None, :], self.block_size).to(w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        ref = project(self.inner, x)
        for i, s in enumerate(self.scales):
            qw = self.qweights[i] if self.qweights is not None else self._candidate(s)
            out = linear(x / s.to(x.dtype), qw, self.inner.bias)
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


def resmooth(model: CausalLM, scales: dict[str, Tensor]) -> dict[str, Tensor]:
    """Model Optimizer's export of AWQ scales (see the module docstring): every projection's
    smoothed weight W·s in its dtype, those of a shared-input group resmoothed to the group's
    mean pre-quant scale, which is folded into the norm before them (in place). Returns the
    weights to quantize by projection name; the names of the groups' projections leave
    ``scales`` (no run-time scaling is left for them), or, where no norm precedes them (OLMo),
    take the group's shared scale."""
    modules = dict(model.named_modules())
    weights = {}
    for name, s in scales.items():
        w = modules[name].weight.detach()
        weights[name] = (w.float() * s[None, :]).to(w.dtype)
    for norm, names in shared_input_groups(model):
        pre = [1.0 / scales.pop(n) for n in names]
        mean = torch.stack(pre).mean(dim=0)
        for n, p in zip(names, pre):
            if not torch.equal(p, mean):
                w = weights[n]
                weights[n] = w * p.to(w.dtype)[None, :] / mean.to(w.dtype)[None, :]
        if norm is None:
            scales.update({n: 1.0 / mean for n in names})  # one tensor each: saved apart
        else:
            norm.fold(lambda factor: factor * mean)
    return weights


@handler(Int4AWQConfig)
def apply_int4(lm: LoadedModel, config: Int4AWQConfig) -> None:
    model = lm.model
    if model.config.modelopt == "W4A16_AWQ":  # published in this form: its codes as they are, on this device's path
        for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, Int4WeightOnlyLinear)]:
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, Int4WeightOnlyLinear(
                m.codes, m.scale, m.in_features, m.block_size, m.bias, None, m.weight.dtype,
                use_kernel=config.kernel != "off", kernel_max_rows=INT4_KERNEL_MODES[config.kernel],
                pre_quant_scale=m.pre_quant_scale))
        return
    # K and V scales from the model as it is, before any weight is quantized (max calibration)
    stats = calibrate(lm, config.calibration) if config.fp8_kv_cache else {}
    scales: dict[str, Tensor] = {}
    if config.awq:
        settings = {"block_size": config.block_size, "alpha_steps": config.alpha_steps}
        found = cached(lm, config.calibration, "awq-lite", settings,
                       lambda seqs: search(lm, seqs, config.block_size, config.alpha_steps))
        for parent, attr, name in projections(model):
            w_mean = weight_channel_mean(getattr(parent, attr).weight.detach(), config.block_size)
            f = found[name]
            scales[name] = awq_scale(torch.tensor(f["x_mean"], device=w_mean.device), w_mean, f["alpha"])
    weights = resmooth(model, scales) if config.awq and config.resmooth else {}
    for parent, attr, name in projections(model):
        linear = getattr(parent, attr)
        setattr(parent, attr, Int4WeightOnlyLinear.from_linear(
            linear, config.block_size, scales.get(name), use_kernel=config.kernel != "off",
            kernel_max_rows=INT4_KERNEL_MODES[config.kernel], weight=weights.get(name)))
    if config.fp8_kv_cache:
        for i, layer in enumerate(model.model.layers):
            a, key = layer.self_attn, f"model.layers.{i}"
            a.k_cache_quant = FP8StaticQuantizer(kv_scale(stats[f"{key}.k_cache_quant"], "simulate"))
            a.v_cache_quant = FP8StaticQuantizer(kv_scale(stats[f"{key}.v_cache_quant"], "simulate"))
