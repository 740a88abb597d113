"""Fine-grained FP8 (``fp8-block``): the FP8 that DeepSeek-V3's and Qwen3's published FP8
checkpoints carry (config.json ``quant_method: fp8`` with ``weight_block_size: [128, 128]``), as
vLLM, SGLang and TensorRT-LLM run them.

Weights: E4M3 in tiles of 128 output rows x 128 inputs, each tile with a float32 scale (the
checkpoint's ``weight_scale_inv``), quantized as transformers' fine-grained FP8 quantizer writes
them: the tile times 448 / its absmax, cast to E4M3; the stored scale is 1 / (448 / absmax); an
all-zero tile has scale 1.
Inputs, at run time: each token's inputs in groups of 128, each group with its own scale, absmax /
448 (the absmax floored at 1e-10, vLLM's ``per_token_group_quant_fp8``), and x / scale cast to
E4M3. No calibration.
The product: per group of 128 inputs, E4M3 times E4M3 summed in float32, times the input group's
and the weight tile's scales, summed over the groups in float32 and rounded once to the
activation dtype (vLLM's ``w8a8_block_fp8_matmul``, DeepGEMM).
A dimension that 128 does not divide ends in a partial tile or group, with a scale of its own over
the values it holds, as the kernels mask them.

Every linear but lm_head and the routers of mixtures of experts; the KV cache and the attention
products stay in the activation dtype, as in those checkpoints.

Published checkpoints of this form (config.json ``quant_method: fp8``, ``weight_block_size [n, n]``)
load as published: their codes and tile scales become these modules (``engine.load``), and the
recipe quantizes nothing more.

Simulated on every device: the inputs' E4M3 values times their group scales meet the weights'
E4M3 values times their tile scales (both float32) in one float32 GEMM. That is the kernel's sum,
up to float32 rounding order. Run records say so.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..engine.linear import linear
from ..engine.load import LoadedModel
from .api import handler, register_module
from .calibrate import projections
from .configs import FP8BlockConfig
from .fp8 import E4M3_MAX, quantize_e4m3

# vLLM's floor on a group's absmax, so that an all-zero group never divides by zero
GROUP_EPS = 1e-10


def _tiles(x: Tensor, block: int) -> Tensor:
    """float32 ``x`` [..., n] zero-padded to a multiple of ``block`` and viewed as [..., n / block, block]
    (zeros change no absmax)."""
    pad = -x.shape[-1] % block
    x = x.float()
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(*x.shape[:-1], -1, block)


def quantize_weight(w: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """``w`` [out, in] as E4M3 codes [out, in] and float32 tile scales [ceil(out / block), ceil(in / block)]."""
    out, inp = w.shape
    rows = -(-out // block)
    padded = _tiles(w, block)  # [out, in tiles, block]
    padded = torch.nn.functional.pad(padded, (0, 0, 0, 0, 0, rows * block - out))
    tiles = padded.view(rows, block, padded.shape[1], block)  # [row tiles, block, col tiles, block]
    amax = tiles.abs().amax(dim=(1, 3))  # [row tiles, col tiles]
    factor = torch.where(amax > 0, E4M3_MAX / torch.where(amax > 0, amax, 1.0), 1.0)
    codes = (tiles * factor[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    codes = codes.view(rows * block, -1)[:out, :inp].contiguous()  # the padding not kept
    return codes, (1.0 / factor).float()


def weight_values(codes: Tensor, scale: Tensor, block: int) -> Tensor:
    """float32 [out, in]: each E4M3 code times its tile's scale."""
    out, inp = codes.shape
    tile_scale = scale.repeat_interleave(block, dim=0)[:out].repeat_interleave(block, dim=1)[:, :inp]
    return codes.float() * tile_scale


def quantize_input(x: Tensor, block: int) -> Tensor:
    """``x`` [..., n] as the deployed kernel quantizes it, per token in groups of ``block``,
    returned as float32 values (E4M3 value times its group's scale) shaped like ``x``."""
    groups = _tiles(x, block)
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp_(min=GROUP_EPS) / E4M3_MAX
    values = quantize_e4m3(groups, scale).mul_(scale)
    return values.view(*x.shape[:-1], -1)[..., :x.shape[-1]]


@register_module
class FP8BlockLinear(nn.Module):
    """A linear with block-scaled E4M3 weights whose inputs are quantized per token group at run time."""

    def __init__(self, qweight: Tensor, weight_scale_inv: Tensor, block_size: int, bias: Tensor | None,
                 act_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.act_dtype, self.block_size = act_dtype, int(block_size)
        self.register_buffer("qweight", qweight.to(torch.float8_e4m3fn))  # what the checkpoint holds
        self.register_buffer("weight_scale_inv", weight_scale_inv.float())  # [row tiles, col tiles]
        self.register_buffer("weight_f32", weight_values(self.qweight, self.weight_scale_inv, self.block_size),
                             persistent=False)  # the simulated GEMM's operand
        self.bias = bias

    @classmethod
    def from_linear(cls, linear_: nn.Linear, block_size: int) -> "FP8BlockLinear":
        w = linear_.weight.detach()
        codes, scale = quantize_weight(w, block_size)
        bias = None if linear_.bias is None else linear_.bias.detach()
        return cls(codes, scale, block_size, bias, w.dtype)

    @staticmethod
    def fused(mods: list["FP8BlockLinear"]) -> "FusedFP8Block | None":
        """One product for projections that read one input (q/k/v, gate/up): the input's groups
        are quantized once, from the input alone, so fusing changes no number."""
        first = mods[0]
        key = (first.block_size, first.act_dtype, first.bias is None)
        same = all(type(m) is FP8BlockLinear and (m.block_size, m.act_dtype, m.bias is None) == key for m in mods)
        return FusedFP8Block(mods) if same else None

    def forward(self, x: Tensor) -> Tensor:
        return _product(x, self.weight_f32, self.block_size, self.bias)

    def export(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {"qweight": self.qweight, "weight_scale_inv": self.weight_scale_inv}
        if self.bias is not None:
            tensors["bias"] = self.bias
        return tensors, {"block_size": self.block_size}

    @classmethod
    def from_export(cls, t: dict[str, Tensor], attrs: dict, dtype: torch.dtype) -> "FP8BlockLinear":
        return cls(t["qweight"], t["weight_scale_inv"], attrs["block_size"], t.get("bias"), dtype)

    def extra_repr(self) -> str:
        out, inp = self.qweight.shape
        return f"in_features={inp}, out_features={out}, block_size={self.block_size}"


class FusedFP8Block:
    """Projections of one input as one product over their concatenated weights (the modules' own
    become views of it). Valid while the model holds these modules with those weights."""

    def __init__(self, mods: list[FP8BlockLinear]):
        first = mods[0]
        self.mods, self.block_size = tuple(mods), first.block_size
        self.weight_f32 = torch.cat([m.weight_f32 for m in mods])
        for m, w in zip(mods, self.weight_f32.split([m.weight_f32.shape[0] for m in mods])):
            m.weight_f32 = w
        self.views = tuple(m.weight_f32 for m in mods)
        self.bias = None if first.bias is None else torch.cat([m.bias for m in mods])

    def valid_for(self, mods: list[nn.Module]) -> bool:
        return len(mods) == len(self.mods) and all(
            a is b and a.weight_f32 is v for a, b, v in zip(mods, self.mods, self.views))

    def __call__(self, x: Tensor) -> Tensor:
        return _product(x, self.weight_f32, self.block_size, self.bias)


def _product(x: Tensor, weight_f32: Tensor, block: int, bias: Tensor | None) -> Tensor:
    """x quantized per token group, times the weights' block-scaled values in float32, rounded to x's dtype."""
    y = linear(quantize_input(x, block), weight_f32).to(x.dtype)  # float32, batch-invariant on the CPU
    return y if bias is None else y + bias


@handler(FP8BlockConfig)
@torch.no_grad()
def apply_fp8_block(lm: LoadedModel, config: FP8BlockConfig) -> None:
    """Quantize every projection; a checkpoint published in this form loaded as it is (its
    projections without scales, which the publisher kept, stay as they are)."""
    if lm.model.config.fp8_block is not None:
        return
    made = [(parent, attr, FP8BlockLinear.from_linear(getattr(parent, attr), config.block_size))
            for parent, attr, _name in projections(lm.model)]
    for parent, attr, q in made:
        setattr(parent, attr, q)
