"""INT8 W8A8 in llm-compressor's form (``int8-w8a8``): what its SmoothQuantModifier and
GPTQModifier with the W8A8 scheme compute, what compressed-tensors' ``int-quantized`` checkpoints
hold (Red Hat's *-quantized.w8a8 models), and what vLLM's INT8 kernels compute from them.

The product, as vLLM runs such a checkpoint (``Int8W8A8Linear``):
- weights: INT8 codes [-128, 127] with one scale per output channel;
- each input row (token) quantized at run time by vLLM's dynamic per-token kernel: s = absmax / 127
  in float32, codes = round-half-even(x · (127 / absmax)), saturated to [-128, 127] (an all-zero
  row: codes 0, scale 0);
- the INT8 product summed in int32, then y = (acc · s_w) · s_x in float32 (CUTLASS's epilogue
  order), plus the bias, rounded once to the activation dtype.
The int32 sums come from ``torch._int_mm``, or from float32 GEMMs on the codes: a float32 sum of
integers is exact, in any order, while every partial sum stays below 2^24 in magnitude. A code
product is at most 127 · 128, so slices of ``EXACT_SLICE`` inputs always are exact, and a whole
row is where 128 · Σ|input codes| < 2^24 (checked per call on the CPU, and the usual case: a
token's codes are small but for its few largest inputs); otherwise the slices are added in int32.
Both routes give the same numbers; the float32 one is the fast one on the CPU (``torch._int_mm``
runs 4-20x slower than a BF16 GEMM there, docs/PERF.md), ``_int_mm`` the one on CUDA (INT8 tensor
cores).

Calibration, as llm-compressor's default (independent) pipeline runs its two modifiers, each over
the whole model before the next:

1. SmoothQuant (``smoothquant``), layer by layer: the layer runs its calibration inputs; each
   mapping's norm output (the one before q/k/v; the one before gate/up, except in a mixture's
   layer, where llm-compressor and TensorRT-LLM smooth attention only) gives each channel's range,
   max - min over every token, in the model's dtype. Per channel, s = range^α / w^(1-α) with w
   twice the largest |weight| of that input column over the projections the norm feeds (where
   w = 0: s = range), floored at 1e-5 (a float32 floor: s becomes float32). The norm's weight is
   divided by s and those projections' weights multiplied by it (float32, rounded once to the
   model's dtype). The smoothed layer's outputs are the next layer's inputs.
2. The weights (``gptq``), layer by layer on the smoothed model: int4-gptq's GPTQ with one group
   per output channel, scale = absmax / 127.5 in the model's dtype (compressed-tensors' min-max),
   codes in [-128, 127]; the layer's projections take their dequantized weights and its outputs
   (inputs unquantized, as in llm-compressor's calibration) are the next layer's inputs. Without
   GPTQ, the weights are rounded plainly with the same scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.load import LoadedModel
from ..engine.model import CausalLM, DecoderLayer, SparseMoE
from .api import handler, register_module
from .calibrate import cached_tensors, check_published_scope
from .configs import Int8W8A8Config
from .gptq import gptq_codes, group_scales, layer_hessians
from .int4_awq_asym import layer_batches, projection_names

INT8_MIN, INT8_MAX = -128, 127
WEIGHT_DIVISOR = 127.5  # compressed-tensors' symmetric scale: absmax / ((127 - -128) / 2)
INPUT_BOUND = 127.0  # vLLM's dynamic per-token INT8 kernel: scale = absmax / 127
EXACT_BELOW = 2 ** 24  # float32 holds every integer below this
EXACT_SLICE = 1024  # 127 · 128 · 1024 < 2^24: a float32 sum of this many code products is exact
MIN_SMOOTHING_SCALE = 1e-5  # llm-compressor's floor on a smoothing scale
INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA takes more than 16 rows


def channel_scales(w: Tensor) -> Tensor:
    """Scales [out, 1] in w's dtype: compressed-tensors' symmetric INT8 per output channel."""
    return group_scales(w, w.shape[1], WEIGHT_DIVISOR)


def round_channels(w: Tensor, scale: Tensor) -> Tensor:
    """Plain rounding: codes [out, in] (int8) of ``w`` with scales [out, 1], the quotient in float32."""
    return torch.round(torch.clamp(w.float() / scale.float(), INT8_MIN, INT8_MAX)).to(torch.int8)


def quantize_tokens(x: Tensor) -> tuple[Tensor, Tensor]:
    """vLLM's dynamic per-token INT8 quantization of x [rows, in], as the module docstring says:
    the codes (integers in [-128, 127], as float32) and the float32 scales [rows, 1]."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    # true divisions by a tensor: torch divides a Python number by a tensor as reciprocal times the
    # number, and on CUDA divides by a Python number as times its reciprocal (a last bit apart); made
    # on the device by a fill, which needs no copy from the host (and so can be graph-captured)
    bound = torch.full_like(absmax, INPUT_BOUND)
    inverse = torch.where(absmax > 0, bound / absmax, 0.0)  # an all-zero row: codes 0
    return (xf * inverse).round_().clamp_(INT8_MIN, INT8_MAX), absmax / bound


def int_sums(xq: Tensor, codes: Tensor, codes_f32: Tensor, int_mm: bool) -> Tensor:
    """The int32 sums xq·codesᵀ as float32 (rounded as CUTLASS converts its int32 accumulator), xq
    the input codes (float32): by ``torch._int_mm``, or by float32 GEMMs on ``codes_f32`` (the
    weight codes as float32), over every input at once where that is exact, else per slice of
    ``EXACT_SLICE`` inputs with the slices added in int32 (module docstring)."""
    rows, k = xq.shape
    if int_mm:
        q = xq.to(torch.int8)
        if q.is_cuda and rows < INT_MM_MIN_ROWS:
            q = F.pad(q, (0, 0, 0, INT_MM_MIN_ROWS - rows))
        return torch._int_mm(q, codes.t())[:rows].float()
    if k <= EXACT_SLICE or (not xq.is_cuda and -INT8_MIN * xq.abs().sum(dim=-1).max().item() < EXACT_BELOW):
        return F.linear(xq, codes_f32)
    total = None
    for lo in range(0, k, EXACT_SLICE):
        part = F.linear(xq[:, lo:lo + EXACT_SLICE], codes_f32[:, lo:lo + EXACT_SLICE]).to(torch.int32)
        total = part if total is None else total.add_(part)
    return total.float()


def _int_mm_fits(codes: Tensor) -> bool:
    """torch._int_mm's shape limits on CUDA: inputs and outputs in eights."""
    return not codes.is_cuda or (codes.shape[0] % 8 == 0 and codes.shape[1] % 8 == 0)


@register_module
class Int8W8A8Linear(nn.Module):
    """INT8 weights with a float32 scale per output channel, inputs quantized per token at run
    time; the product as vLLM computes it (module docstring). ``kernel``: ``int_mm`` sums with
    ``torch._int_mm``, ``off`` with exact float32 GEMMs, ``auto`` with ``_int_mm`` on CUDA only;
    ``last_path`` says which ran."""

    def __init__(self, codes: Tensor, scale: Tensor, bias: Tensor | None, dtype: torch.dtype, kernel: str = "auto"):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.float().reshape(-1))
        self.bias = bias
        self.act_dtype, self.kernel = dtype, kernel
        self.in_features = codes.shape[1]
        # the float32 route's weights (4 bytes a weight, beside the codes)
        self.register_buffer("codes_f32", self.codes.float(), persistent=False)
        self.last_path = None

    @property
    def uses_int_mm(self) -> bool:
        wanted = self.kernel == "int_mm" or (self.kernel == "auto" and self.codes.is_cuda)
        return wanted and _int_mm_fits(self.codes)

    @staticmethod
    def fused(mods: list["Int8W8A8Linear"]) -> "FusedInt8 | None":
        """One product for projections that read one input (q/k/v, gate/up): their inputs are
        quantized alike, so their codes and scales concatenate."""
        first = mods[0]
        same = all(type(m) is Int8W8A8Linear and (m.kernel, m.act_dtype, m.in_features, m.bias is None) ==
                   (first.kernel, first.act_dtype, first.in_features, first.bias is None) for m in mods)
        return FusedInt8(mods) if same else None

    def forward(self, x: Tensor) -> Tensor:
        y, self.last_path = _product(x, self.codes, self.scale, self.bias, self.codes_f32, self.uses_int_mm,
                                     self.act_dtype)
        return y

    def export(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {"codes": self.codes, "scale": self.scale}
        if self.bias is not None:
            tensors["bias"] = self.bias
        return tensors, {"kernel": self.kernel}

    @classmethod
    def from_export(cls, t: dict[str, Tensor], attrs: dict, dtype: torch.dtype) -> "Int8W8A8Linear":
        return cls(t["codes"], t["scale"], t.get("bias"), dtype, attrs["kernel"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.codes.shape[0]}, kernel={self.kernel}"


class FusedInt8:
    """Projections of one input as one INT8 product over their concatenated codes and scales (the
    modules' own become views of them: no second copy). Valid while the model still holds these
    modules (``valid_for``); the first module's ``kernel`` chooses the route."""

    def __init__(self, mods: list[Int8W8A8Linear]):
        self.mods = tuple(mods)
        rows = [m.codes.shape[0] for m in mods]
        for name in ("codes", "scale", "codes_f32"):
            fused = torch.cat([getattr(m, name) for m in mods])
            setattr(self, name, fused)
            for m, view in zip(mods, fused.split(rows)):
                setattr(m, name, view)
        self.bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods])

    def valid_for(self, mods: list[nn.Module]) -> bool:
        return len(mods) == len(self.mods) and all(a is b for a, b in zip(mods, self.mods))

    def __call__(self, x: Tensor) -> Tensor:
        first = self.mods[0]
        int_mm = first.uses_int_mm and _int_mm_fits(self.codes)
        y, path = _product(x, self.codes, self.scale, self.bias, self.codes_f32, int_mm, first.act_dtype)
        for m in self.mods:
            m.last_path = path
        return y


def _product(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, codes_f32: Tensor,
             int_mm: bool, dtype: torch.dtype) -> tuple[Tensor, str]:
    flat = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_tokens(flat)
    y = int_sums(xq, codes, codes_f32, int_mm) * scale * x_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype).view(*x.shape[:-1], -1), "int_mm" if int_mm else "float32"


# --- calibration ------------------------------------------------------------------------------


def smoothing_groups(layer: DecoderLayer) -> list[tuple[str, list[str]]]:
    """(the norm's name in ``layer``, the projections it feeds) for each norm SmoothQuant divides:
    the one before q/k/v, and in a dense layer the one before gate/up (a mixture's is left alone)."""
    attention = ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
    if isinstance(layer.mlp, SparseMoE):
        return [attention]
    return [attention, (layer.mlp_norm_name, ["mlp.gate_proj", "mlp.up_proj"])]


class _RangeRecorder(nn.Module):
    """A norm that keeps the per-channel min and max of its outputs (in their dtype)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.low, self.high = inner, None, None

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        flat = out.reshape(-1, out.shape[-1])
        if flat.shape[0]:
            low, high = flat.amin(dim=0), flat.amax(dim=0)
            self.low = low if self.low is None else torch.minimum(self.low, low)
            self.high = high if self.high is None else torch.maximum(self.high, high)
        return out


def smoothing_scales(value_range: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """llm-compressor's SmoothQuant scales (float32) for one norm: ``value_range`` [in] of its
    outputs, ``weights`` those of the projections it feeds, computed in their dtype."""
    w = 2.0 * torch.cat([w.abs().amax(dim=0, keepdim=True) for w in weights]).amax(dim=0)
    scales = torch.where(w > 0.0, value_range.pow(alpha) / w.pow(1 - alpha), value_range)
    return torch.maximum(scales, torch.tensor([MIN_SMOOTHING_SCALE], device=scales.device))


@torch.inference_mode()
def smooth(model: CausalLM, sequences: list[list[int]], alpha: float) -> None:
    """SmoothQuant over the whole model, layer by layer (step 1 of the module docstring), in place."""
    batches = layer_batches(model, sequences)
    for layer in model.model.layers:
        groups = smoothing_groups(layer)
        recorders = {norm: _RangeRecorder(getattr(layer, norm)) for norm, _names in groups}
        for norm, recorder in recorders.items():
            setattr(layer, norm, recorder)
        try:
            for x, cos, sin, step in batches:
                layer(x, cos, sin, step)
        finally:
            for norm, recorder in recorders.items():
                setattr(layer, norm, recorder.inner)
        for norm, names in groups:
            linears = [layer.get_submodule(n) for n in names]
            recorder = recorders[norm]
            scales = smoothing_scales(recorder.high - recorder.low, [m.weight for m in linears], alpha)
            for m in linears:
                m.weight.copy_((m.weight.float() * scales[None, :]).to(m.weight.dtype))
            getattr(layer, norm).fold(lambda factor: factor / scales)
        batches = [(layer(x, cos, sin, step), cos, sin, step) for x, cos, sin, step in batches]


@torch.inference_mode()
def quantize_weights(model: CausalLM, sequences: list[list[int]], config: Int8W8A8Config) -> dict[str, Tensor]:
    """Every projection's codes and scales (``<name>.codes``, ``<name>.scale``), step 2 of the
    module docstring; the projections are left holding their dequantized weights."""
    batches = layer_batches(model, sequences) if config.gptq else []
    found: dict[str, Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        names = projection_names(layer)
        hessians = layer_hessians(layer, names, batches, len(sequences)) if config.gptq else {}
        for name in names:
            linear = layer.get_submodule(name)
            w = linear.weight.detach()
            scale = channel_scales(w)
            if config.gptq:
                codes = gptq_codes(w, hessians.get(name), scale, w.shape[1], actorder=config.actorder,
                                   dampening=config.dampening, gptq_block=config.gptq_block,
                                   code_range=(INT8_MIN, INT8_MAX))
            else:
                codes = round_channels(w, scale)
            found[f"model.layers.{i}.{name}.codes"], found[f"model.layers.{i}.{name}.scale"] = codes, scale
            linear.weight.copy_(codes.to(scale.dtype) * scale)
        if config.gptq:
            batches = [(layer(x, cos, sin, step), cos, sin, step) for x, cos, sin, step in batches]
    return found


def calibrated(model: CausalLM, sequences: list[list[int]], config: Int8W8A8Config) -> dict[str, Tensor]:
    """SmoothQuant, then the weights' codes; returns the codes and scales and every norm weight
    SmoothQuant changed (``<name>.weight``), which a cached result restores."""
    if config.smoothquant:
        smooth(model, sequences, config.smoothing_strength)
    found = quantize_weights(model, sequences, config)
    if config.smoothquant:
        for i, layer in enumerate(model.model.layers):
            for norm, _names in smoothing_groups(layer):
                found[f"model.layers.{i}.{norm}.weight"] = getattr(layer, norm).weight.detach().clone()
    return found


@handler(Int8W8A8Config)
@torch.inference_mode()
def apply_int8_w8a8(lm: LoadedModel, config: Int8W8A8Config) -> None:
    """The recipe on an unquantized model (calibrated, cached per weights, corpus and settings),
    or a checkpoint published in compressed-tensors' W8A8 form loaded as it is, if its INT8
    projections are the recipe's."""
    model = lm.model
    if model.config.compressed_int8:
        check_published_scope(model, "int8-w8a8", Int8W8A8Linear, "INT8")
    else:
        if config.smoothquant or config.gptq:
            settings = {k: v for k, v in config.__dict__.items() if k not in ("calibration", "kernel")}
            found = cached_tensors(lm, config.calibration, "int8-w8a8", settings,
                                   lambda seqs: calibrated(model, seqs, config))
        else:
            found = quantize_weights(model, [], config)
        for i, layer in enumerate(model.model.layers):
            if config.smoothquant:  # a cached result finds the norms as loaded
                for norm, _names in smoothing_groups(layer):
                    getattr(layer, norm).weight.copy_(found[f"model.layers.{i}.{norm}.weight"])
            for name in projection_names(layer):
                linear, key = layer.get_submodule(name), f"model.layers.{i}.{name}"
                parent, attr = name.rsplit(".", 1)
                setattr(layer.get_submodule(parent), attr, Int8W8A8Linear(
                    found[f"{key}.codes"], found[f"{key}.scale"], None if linear.bias is None else linear.bias.detach(),
                    linear.weight.dtype))
    for m in model.modules():
        if isinstance(m, Int8W8A8Linear):
            m.kernel = config.kernel
