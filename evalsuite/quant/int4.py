"""INT4 weight-only quantization, symmetric, in blocks along the input dimension (simulated).

A block of ``block_size`` input channels of one output row shares a scale = block absmax / 7;
values round to nearest (ties to even, ``torch.round``) and clamp to [-8, 7]. When in_features
is not a multiple of the block size (SmolLM2's 576 = 4.5 x 128), the row is padded with zeros:
zeros change no block absmax and quantize to zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INT4_MIN, INT4_MAX = -8, 7


def pad_to_blocks(w: Tensor, block_size: int) -> Tensor:
    pad = (-w.shape[-1]) % block_size
    return F.pad(w, (0, pad)) if pad else w


def int4_block_quantize(w: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Integer codes [out, in_padded] (int8 holding -8..7) and scales [out, blocks] (float32)."""
    wp = pad_to_blocks(w.float(), block_size)
    blocks = wp.view(wp.shape[0], -1, block_size)
    scale = blocks.abs().amax(dim=-1) / INT4_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block stays zero
    codes = torch.round(blocks / safe[..., None]).clamp(INT4_MIN, INT4_MAX)
    return codes.view_as(wp).to(torch.int8), scale


def int4_block_dequantize(codes: Tensor, scale: Tensor, in_features: int, block_size: int) -> Tensor:
    out = codes.float().view(codes.shape[0], -1, block_size) * scale[..., None]
    return out.view(codes.shape[0], -1)[:, :in_features]


def int4_fake_quantize(w: Tensor, block_size: int) -> Tensor:
    codes, scale = int4_block_quantize(w, block_size)
    return int4_block_dequantize(codes, scale, w.shape[-1], block_size).to(w.dtype)


def pack_nibbles(codes: Tensor) -> Tensor:
    """int8 codes in [-8, 7], even column count -> uint8, two codes per byte (low nibble first)."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).view(packed.shape[0], -1)


# Rows up to which the packed INT4 CPU kernel beats a BF16 matmul on the dequantized weight
# (decode); larger batches and prefill use the dense path. See docs/PERF.md.
KERNEL_MAX_ROWS = 4


def int4_kernel_available(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class Int4WeightOnlyLinear(nn.Module):
    """INT4 weights (block scales), BF16 inputs; optional AWQ input pre-scale (x / s).

    Two paths compute the same product: ``simulated`` multiplies by the dequantized weight (the
    reference), ``kernel`` runs torch's packed INT4 CPU kernel (``_weight_int4pack_mm_for_cpu``,
    codes stored as 0..15 with a zero point of 8, BF16 scales) for calls of at most
    ``KERNEL_MAX_ROWS`` rows. ``use_kernel`` chooses; ``last_path`` says which ran."""

    def __init__(self, codes: Tensor, scale: Tensor, in_features: int, block_size: int, bias: Tensor | None,
                 input_scale: Tensor | None, dtype: torch.dtype, use_kernel: bool = False):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.in_features, self.block_size = in_features, block_size
        self.bias = bias
        self.register_buffer("input_scale", input_scale)  # AWQ: inputs are divided by this
        # the simulated path multiplies by the dequantized weight, built once
        self.register_buffer("weight", int4_block_dequantize(codes, scale, in_features, block_size).to(dtype),
                             persistent=False)
        self.use_kernel = use_kernel and int4_kernel_available(dtype)
        self.last_path = "simulated"
        if self.use_kernel:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes.int() + 8), 2)
            self.scales_and_zeros = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1).to(dtype).contiguous()

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 128, awq_scale: Tensor | None = None,
                    use_kernel: bool = False):
        w = linear.weight.detach()
        if awq_scale is not None:
            w = w.float() * awq_scale[None, :]
        codes, scale = int4_block_quantize(w, block_size)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(codes, scale, w.shape[1], block_size, bias,
                   None if awq_scale is None else awq_scale.to(linear.weight.dtype), linear.weight.dtype, use_kernel)

    def export(self) -> tuple[dict[str, Tensor], dict]:
        """Codes packed two per byte (0..15, zero point 8), float32 block scales."""
        tensors = {"packed_codes": pack_nibbles(self.codes), "scale": self.scale}
        if self.input_scale is not None:
            tensors["input_scale"] = self.input_scale
        if self.bias is not None:
            tensors["bias"] = self.bias
        return tensors, {"in_features": self.in_features, "block_size": self.block_size, "use_kernel": self.use_kernel}

    @classmethod
    def from_export(cls, t: dict[str, Tensor], attrs: dict, dtype: torch.dtype) -> "Int4WeightOnlyLinear":
        return cls(unpack_nibbles(t["packed_codes"]), t["scale"], attrs["in_features"], attrs["block_size"],
                   t.get("bias"), t.get("input_scale"), dtype, attrs["use_kernel"])

    def forward(self, x: Tensor) -> Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale
        rows = x.numel() // x.shape[-1]
        if self.use_kernel and rows <= KERNEL_MAX_ROWS:
            self.last_path = "kernel"
            flat = pad_to_blocks(x.reshape(rows, x.shape[-1]), self.block_size)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.block_size, self.scales_and_zeros)
            y = y.view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        self.last_path = "simulated"
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.codes.shape[0]}, block_size={self.block_size}, "
                f"awq={self.input_scale is not None}")
