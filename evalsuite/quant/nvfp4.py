"""NVIDIA Model Optimizer NVFP4 (``nvfp4``): weights and activations in FP4, as Blackwell runs them.

NVFP4 holds a tensor as FP4 E2M1 values (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6) in blocks of 16
along the input dimension; each block has an E4M3 scale, and the tensor one float32 scale s
= amax / (6 · 448), so that the largest block scale lands near E4M3's 448. A block's E4M3 scale
is its absmax / (6 · s) rounded to E4M3; each value x / (E4M3 scale · s) rounds to the nearest
E2M1 value, ties to even (Model Optimizer's fake quantization and export round alike).

Weights: s from the weight's absmax. Inputs: s from the absmax calibration saw (static), block
scales from each token's values at run time (dynamic), as Model Optimizer's NVFP4_DEFAULT_CFG
calibrates them and TensorRT-LLM and vLLM run them. The product is computed as the Blackwell
GEMM computes it: the blocks' values times their E4M3 scales are exact in float32, their
products accumulate in float32, and the two tensors' scales multiply the result once (the GEMM's
alpha) before it is rounded to the activation dtype.

Projections that a deploying engine fuses into one GEMM (q/k/v, gate/up, each expert's gate/up)
share one weight scale and one input scale, the largest of the group's, as Model Optimizer's
export unifies them; a mixture's experts share one input scale per projection, as with FP8.
The KV cache is FP8 with static per-tensor scales (Model Optimizer's default ``fp8`` KV cache
format); the attention products stay in the activation dtype. lm_head and the routers of
mixtures of experts stay in BF16.

No GPU before Blackwell (sm_100) has FP4 tensor cores: everywhere, the recipe runs this
simulation, and run records say so.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..engine.linear import linear
from ..engine.load import LoadedModel
from .api import handler, register_module
from .calibrate import calibrate, projections, shared_input_groups
from .configs import NVFP4Config
from .fp8 import E4M3_MAX, FP8StaticQuantizer, experts_share_input_amax, float32, kv_scale, round_e4m3

FP4_MAX = 6.0
E4M3_SMALLEST = 2.0 ** -9  # E4M3's smallest subnormal
BLOCK = 16
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1's magnitudes by code; bit 3 of a code is the sign


def round_e2m1(x: Tensor) -> Tensor:
    """The nearest E2M1 value to each element of float32 ``x``, ties to even, saturating at ±6.
    E2M1 is evenly spaced within each binade (0.5 below 2, 1 below 4, then 2), so it is x rounded
    to a multiple of its binade's spacing; torch.round rounds half to even, and a multiple of the
    spacing is even where its code is: 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 3.5 -> 4, 5 -> 4."""
    a = x.abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return a.div_(step).round_().mul_(step).clamp_(max=FP4_MAX).copysign_(x)


def e2m1_codes(values: Tensor) -> Tensor:
    """The 4-bit codes of E2M1 values (what ``round_e2m1`` gives; -0 has code 8)."""
    magnitude = torch.bucketize(values.abs().contiguous(), torch.tensor(E2M1, device=values.device))
    return (magnitude + 8 * torch.signbit(values)).to(torch.uint8)


def e2m1_values(codes: Tensor) -> Tensor:
    """float32 values of E2M1 codes."""
    table = torch.tensor(E2M1 + tuple(-v for v in E2M1), device=codes.device)
    return table[codes.long()]


def global_scale(amax: float) -> float:
    """The per-tensor scale: amax / (6 · 448), so that the largest block's E4M3 scale is 448
    (floored, as Model Optimizer's kernel floors it, so that an all-zero tensor stays zero), in
    float32 as Model Optimizer computes and exports it."""
    return float32(max(amax / (FP4_MAX * E4M3_MAX), 1e-12))


def quantize_blocks(x: Tensor, scale: float, weights: bool = False) -> tuple[Tensor, Tensor]:
    """``x`` [..., n] (n a multiple of 16) as NVFP4 with per-tensor ``scale``: its E2M1 values
    (float32 [..., n]) and the blocks' E4M3 scales (float32 values [..., n / 16]).
    Activations, as the deployed kernel quantizes them: a block whose scale rounds below E4M3's
    smallest value has scale 0 and values 0. ``weights``, as Model Optimizer's export stores them:
    an all-zero block has scale 1, every other at least 2^-9 (E4M3's smallest value)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    raw = blocks.abs().amax(dim=-1) / (FP4_MAX * scale)
    if weights:
        raw = torch.where(raw == 0, 1.0, raw).clamp(min=E4M3_SMALLEST)
    block_scale = round_e4m3(raw.clamp(max=E4M3_MAX))
    step = (block_scale * scale)[..., None]
    values = round_e2m1(blocks / torch.where(step > 0, step, torch.ones_like(step)))
    return values.reshape(x.shape), block_scale


def block_values(values: Tensor, block_scale: Tensor) -> Tensor:
    """Each E2M1 value times its block's E4M3 scale, float32 (exact): what the GEMM multiplies,
    the per-tensor scale left out."""
    return (values.reshape(*values.shape[:-1], -1, BLOCK) * block_scale[..., None]).reshape(values.shape)


@register_module
class NVFP4Linear(nn.Module):
    """A linear with NVFP4 weights and inputs: packed E2M1 codes, E4M3 block scales and the two
    per-tensor scales (Model Optimizer's export names them ``weight_scale_2`` and ``input_scale``)."""

    def __init__(self, codes: Tensor, block_scale: Tensor, weight_tensor_scale: float, input_scale: float,
                 bias: Tensor | None, act_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.act_dtype = act_dtype
        self.register_buffer("codes", codes.to(torch.uint8))
        self.register_buffer("block_scale", block_scale.to(torch.float8_e4m3fn))  # exact: E4M3 values
        weight = block_values(e2m1_values(self.codes), self.block_scale.float())
        self.register_buffer("weight_f32", weight, persistent=False)
        self.weight_tensor_scale, self.input_scale = float32(weight_tensor_scale), float32(input_scale)
        self.bias = bias

    @staticmethod
    def fused(mods: list["NVFP4Linear"]) -> "FusedNVFP4 | None":
        """One product for projections that read one input (q/k/v, gate/up) when they share both
        tensor scales (``fused_scales``): the input is quantized once and one GEMM runs, as the
        deploying engine runs them."""
        first = mods[0]
        key = (first.weight_tensor_scale, first.input_scale, first.act_dtype, first.bias is None)
        same = all(type(m) is NVFP4Linear and
                   (m.weight_tensor_scale, m.input_scale, m.act_dtype, m.bias is None) == key for m in mods)
        return FusedNVFP4(mods) if same else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_amax: float, input_amax: float) -> "NVFP4Linear":
        w = linear.weight.detach()
        if w.shape[1] % BLOCK:
            raise ValueError(f"nvfp4: a projection's {w.shape[1]} inputs are not a multiple of {BLOCK}")
        scale = global_scale(weight_amax)
        values, block_scale = quantize_blocks(w, scale, weights=True)
        codes = e2m1_codes(values)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(codes, block_scale, scale, global_scale(input_amax), bias, w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _nvfp4_product(x, self.input_scale, self.weight_f32, self.input_scale * self.weight_tensor_scale,
                              self.bias)

    def export(self) -> tuple[dict[str, Tensor], dict]:
        packed = self.codes[:, 0::2] | (self.codes[:, 1::2] << 4)  # two codes a byte, the first in the low nibble
        tensors = {"weight_packed": packed, "weight_scale": self.block_scale}
        if self.bias is not None:
            tensors["bias"] = self.bias
        return tensors, {"weight_tensor_scale": self.weight_tensor_scale, "input_scale": self.input_scale}

    @classmethod
    def from_export(cls, t: dict[str, Tensor], attrs: dict, dtype: torch.dtype) -> "NVFP4Linear":
        packed = t["weight_packed"]
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
        return cls(codes, t["weight_scale"].float(), attrs["weight_tensor_scale"], attrs["input_scale"], t.get("bias"),
                   dtype)

    def extra_repr(self) -> str:
        out, inp = self.codes.shape
        return f"in_features={inp}, out_features={out}, input_scale={self.input_scale:.6g}, " \
               f"weight_tensor_scale={self.weight_tensor_scale:.6g}"


class FusedNVFP4:
    """Projections of one input with shared tensor scales as one NVFP4 product over their
    concatenated weights (the modules' own become views of it). Valid while the model holds these
    modules with those weights (``valid_for``)."""

    def __init__(self, mods: list[NVFP4Linear]):
        first = mods[0]
        self.mods = tuple(mods)
        self.weight_f32 = torch.cat([m.weight_f32 for m in mods])
        for m, w in zip(mods, self.weight_f32.split([m.weight_f32.shape[0] for m in mods])):
            m.weight_f32 = w
        self.views = tuple(m.weight_f32 for m in mods)
        self.bias = None if first.bias is None else torch.cat([m.bias for m in mods])
        self.input_scale, self.alpha = first.input_scale, first.input_scale * first.weight_tensor_scale

    def valid_for(self, mods: list[nn.Module]) -> bool:
        return len(mods) == len(self.mods) and all(
            a is b and a.weight_f32 is v for a, b, v in zip(mods, self.mods, self.views))

    def __call__(self, x: Tensor) -> Tensor:
        return _nvfp4_product(x, self.input_scale, self.weight_f32, self.alpha, self.bias)


def _nvfp4_product(x: Tensor, input_scale: float, weight_f32: Tensor, alpha: float, bias: Tensor | None) -> Tensor:
    """x quantized to NVFP4 (dynamic block scales under the static tensor scale), times the
    weights' exact block values in float32, scaled once by alpha (the two tensor scales) and
    rounded to x's dtype."""
    values, block_scale = quantize_blocks(x, input_scale)
    y = linear(block_values(values, block_scale), weight_f32)  # float32, batch-invariant on the CPU
    y = y.mul_(alpha).to(x.dtype)
    return y if bias is None else y + bias


@handler(NVFP4Config)
@torch.no_grad()
def apply_nvfp4(lm: LoadedModel, config: NVFP4Config) -> None:
    model = lm.model
    if model.config.modelopt == "NVFP4":  # published in this form: its modules and K and V scales are loaded
        return
    stats = experts_share_input_amax(model, calibrate(lm, config.calibration))
    found = projections(model)
    weight_amax = {name: float(getattr(parent, attr).weight.detach().abs().max()) for parent, attr, name in found}
    input_amax = {name: stats[f"{name}.input"] for _parent, _attr, name in found}
    if config.fused_scales:  # one weight and one input scale per group a deploying engine fuses
        for _norm, names in shared_input_groups(model):
            for amax in (weight_amax, input_amax):
                top = max(amax[n] for n in names)
                amax.update(dict.fromkeys(names, top))
    made = [(parent, attr, NVFP4Linear.from_linear(getattr(parent, attr), weight_amax[name], input_amax[name]))
            for parent, attr, name in found]
    for parent, attr, q in made:
        setattr(parent, attr, q)
    if config.fp8_kv_cache:
        for i, layer in enumerate(model.model.layers):
            a, key = layer.self_attn, f"model.layers.{i}"
            a.k_cache_quant = FP8StaticQuantizer(kv_scale(stats[f"{key}.k_cache_quant"], "simulate"))
            a.v_cache_quant = FP8StaticQuantizer(kv_scale(stats[f"{key}.v_cache_quant"], "simulate"))
