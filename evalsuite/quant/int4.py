"""INT4 weight-only quantization in blocks along the input dimension.

Symmetric (Model Optimizer): a block of ``block_size`` input channels of one output row shares a
scale = block absmax / 7; values round to nearest (ties to even, ``torch.round``) and clamp to
[-8, 7]. When in_features is not a multiple of the block size (SmolLM2's 576 = 4.5 x 128), the
row is padded with zeros: zeros change no block absmax and quantize to zero.

Asymmetric (AutoAWQ's zero-point form): scale = max(block max - block min, 1e-5) / 15, integer
zero point z = clamp(-round(min / scale), 0, 15), q = clamp(round(w / scale) + z, 0, 15), and
w ≈ (q - z)·scale. A padded block takes its min and max over its real channels only.

Storage is common to both: ``codes`` int8 in [-8, 7] hold q - 8 (symmetric codes are q - 8 with
z = 8), so they pack two per byte and feed the packed kernel alike; the asymmetric form adds
``zero_point`` (z per block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.linear import linear as _linear
from .api import register_module
from .configs import KERNEL_MAX_ROWS

INT4_MIN, INT4_MAX = -8, 7
ASYM_MAX = 15


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


def int4_asym_quantize(w: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """AutoAWQ's zero-point INT4: codes [out, in_padded] (int8 holding q - 8), scales and integer
    zero points [out, blocks] (float32, uint8). Padding is excluded from each block's min and max."""
    wp = pad_to_blocks(w.float(), block_size)
    blocks = wp.view(wp.shape[0], -1, block_size)
    real = (torch.arange(wp.shape[1], device=w.device) < w.shape[1]).view(1, -1, block_size)
    hi = torch.where(real, blocks, -torch.inf).amax(dim=-1)
    lo = torch.where(real, blocks, torch.inf).amin(dim=-1)
    scale = (hi - lo).clamp(min=1e-5) / ASYM_MAX
    zero = (-torch.round(lo / scale)).clamp(0, ASYM_MAX)
    q = (torch.round(blocks / scale[..., None]) + zero[..., None]).clamp(0, ASYM_MAX)
    q = torch.where(real, q, zero[..., None])  # padding dequantizes to exactly zero
    return (q - 8).view_as(wp).to(torch.int8), scale, zero.to(torch.uint8)


def int4_block_dequantize(codes: Tensor, scale: Tensor, in_features: int, block_size: int,
                          zero_point: Tensor | None = None) -> Tensor:
    q = codes.float().view(codes.shape[0], -1, block_size)
    if zero_point is not None:
        q = q + 8 - zero_point.float()[..., None]
    out = q * scale[..., None]
    return out.view(codes.shape[0], -1)[:, :in_features]


def int4_fake_quantize(w: Tensor, block_size: int, asymmetric: bool = False) -> Tensor:
    if asymmetric:
        codes, scale, zero = int4_asym_quantize(w, block_size)
        return int4_block_dequantize(codes, scale, w.shape[-1], block_size, zero).to(w.dtype)
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


def int4_kernel_available(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether torch has a packed INT4 kernel for BF16 inputs on this device: the CPU one, or
    tinygemm on CUDA GPUs from sm_80."""
    if dtype != torch.bfloat16:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return hasattr(torch.ops.aten, "_weight_int4pack_mm") and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the packed kernels take


class PackedInt4:
    """Block-quantized codes in a packed INT4 kernel's layout, on the codes' device: torch's CPU
    kernel, or tinygemm on CUDA (``_weight_int4pack_mm``: two codes a byte, the even column in the
    high nibble, tiled by ``_convert_weight_to_int4pack``). Both compute w = (q - 8)·scale + zero
    with BF16 scale and zero [groups, out, 2]. The kernel's groups are the block size, or a divisor
    of it that divides in_features (SmolLM2's 576 = 9 x 64), each block's scale and zero repeated
    over its groups: the same weights, and no input padding per call. Otherwise inputs are padded
    to whole blocks."""

    def __init__(self, codes: Tensor, scale: Tensor, zero_point: Tensor | None, in_features: int, block_size: int,
                 dtype: torch.dtype):
        group = next((g for g in KERNEL_GROUPS if block_size % g == 0 and in_features % g == 0), None)
        self.group, self.k = (group, in_features) if group else (block_size, codes.shape[1])
        reps, groups = block_size // self.group, self.k // self.group
        zero = torch.zeros_like(scale) if zero_point is None else (8 - zero_point.float()) * scale
        s, z = (t.repeat_interleave(reps, dim=1)[:, :groups] for t in (scale, zero))
        self.scales_and_zeros = torch.stack([s.t(), z.t()], dim=-1).to(dtype).contiguous()
        q = codes[:, :self.k].int() + 8
        self.device = codes.device.type
        if self.device == "cuda":
            tiles = next(t for t in (8, 4, 2) if self.k % (16 * t) == 0)
            self.packed = torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8),
                                                                     tiles)
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)

    @staticmethod
    def fits(out_features: int, in_features: int, block_size: int, device: torch.device) -> bool:
        """tinygemm's shape limits: output rows in eights, K in tiles of 32, groups it takes."""
        if torch.device(device).type != "cuda":
            return True
        group = next((g for g in KERNEL_GROUPS if block_size % g == 0 and in_features % g == 0), None)
        k = in_features if group else -(-in_features // block_size) * block_size
        return out_features % 8 == 0 and k % 32 == 0 and (group is not None or block_size in KERNEL_GROUPS)

    def __call__(self, x: Tensor) -> Tensor:
        """x [rows, in_features] -> [rows, out]."""
        if x.shape[-1] != self.k:
            x = F.pad(x, (0, self.k - x.shape[-1]))
        if self.device == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group, self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_and_zeros)


@register_module
class Int4WeightOnlyLinear(nn.Module):
    """INT4 weights (block scales, optional zero points), BF16 inputs; optional AWQ input scaling
    x · p (``pre_quant_scale``, in the activation dtype, as Model Optimizer's AWQ and the kernels
    that deploy it multiply).

    Two paths compute the same product: ``simulated`` multiplies by the dequantized weight (the
    reference), ``kernel`` runs torch's packed INT4 kernel for the device (``PackedInt4``:
    w = (q - 8)·scale + zero with BF16 scale and zero, so zero = (8 - z)·scale) for calls of at
    most ``kernel_max_rows`` rows. ``use_kernel`` chooses: asked for where the device has no such
    kernel, the simulation runs, and ``kernel_asked`` keeps the request (a checkpoint saves it, for a
    device that has one). ``last_path`` says which ran."""

    def __init__(self, codes: Tensor, scale: Tensor, in_features: int, block_size: int, bias: Tensor | None,
                 pre_quant_scale: Tensor | None, dtype: torch.dtype, use_kernel: bool = False,
                 zero_point: Tensor | None = None, kernel_max_rows: int = KERNEL_MAX_ROWS):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)  # asymmetric form only
        self.in_features, self.block_size = in_features, block_size
        self.bias = bias
        self.register_buffer("pre_quant_scale", pre_quant_scale)  # AWQ: inputs are multiplied by this
        # the simulated path multiplies by the dequantized weight, built once
        self.register_buffer("weight", int4_block_dequantize(codes, scale, in_features, block_size, zero_point)
                             .to(dtype), persistent=False)
        self.kernel_asked = use_kernel
        self.use_kernel = use_kernel and int4_kernel_available(dtype, codes.device) and \
            PackedInt4.fits(codes.shape[0], in_features, block_size, codes.device)
        self.kernel_max_rows = kernel_max_rows
        self.last_path = "simulated"
        self.kernel = PackedInt4(codes, scale, zero_point, in_features, block_size, dtype) if self.use_kernel else None

    @staticmethod
    def fused(mods: list["Int4WeightOnlyLinear"]) -> "FusedInt4 | None":
        """One product for projections that read one input (q/k/v, gate/up), when none has an AWQ
        pre-quant scale (each would multiply the input by its own) and they agree on layout and path."""
        first = mods[0]
        same = all(type(m) is Int4WeightOnlyLinear and m.pre_quant_scale is None and
                   (m.in_features, m.block_size, m.use_kernel, m.kernel_max_rows, m.weight.dtype,
                    m.zero_point is None, m.bias is None) ==
                   (first.in_features, first.block_size, first.use_kernel, first.kernel_max_rows, first.weight.dtype,
                    first.zero_point is None, first.bias is None) for m in mods)
        return FusedInt4(mods) if same else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 128, use_kernel: bool = False,
                    kernel_max_rows: int = KERNEL_MAX_ROWS, weight: Tensor | None = None,
                    pre_quant_scale: Tensor | None = None):
        """Quantize ``weight`` (default: the linear's weight; AWQ passes it smoothed), the input
        multiplied by ``pre_quant_scale`` at run time where given."""
        w = linear.weight.detach() if weight is None else weight
        codes, scale = int4_block_quantize(w, block_size)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(codes, scale, w.shape[1], block_size, bias, pre_quant_scale, linear.weight.dtype, use_kernel,
                   kernel_max_rows=kernel_max_rows)

    def export(self) -> tuple[dict[str, Tensor], dict]:
        """Codes packed two per byte (0..15, zero point 8), float32 block scales."""
        tensors = {"packed_codes": pack_nibbles(self.codes), "scale": self.scale}
        if self.zero_point is not None:  # 4 bits each as well, flattened (a row may hold an odd number)
            flat = self.zero_point.flatten().to(torch.int8) - 8
            tensors["packed_zero_point"] = pack_nibbles(F.pad(flat, (0, flat.numel() % 2)).view(1, -1))
        if self.pre_quant_scale is not None:
            tensors["pre_quant_scale"] = self.pre_quant_scale
        if self.bias is not None:
            tensors["bias"] = self.bias
        return tensors, {"in_features": self.in_features, "block_size": self.block_size, "use_kernel": self.kernel_asked,
                         "kernel_max_rows": self.kernel_max_rows}

    @classmethod
    def from_export(cls, t: dict[str, Tensor], attrs: dict, dtype: torch.dtype) -> "Int4WeightOnlyLinear":
        zero = None
        if "packed_zero_point" in t:
            n = t["scale"].numel()
            zero = (unpack_nibbles(t["packed_zero_point"])[0, :n] + 8).to(torch.uint8).view_as(t["scale"])
        pre = t.get("pre_quant_scale")
        if pre is None and "input_scale" in t:  # saved before the scale multiplied (it divided by s = 1 / p)
            pre = (1 / t["input_scale"].float()).to(t["input_scale"].dtype)
        return cls(unpack_nibbles(t["packed_codes"]), t["scale"], attrs["in_features"], attrs["block_size"],
                   t.get("bias"), pre, dtype, attrs["use_kernel"], zero, attrs.get("kernel_max_rows", KERNEL_MAX_ROWS))

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        y, self.last_path = _product(x, self.weight, self.bias, self.kernel, self.kernel_max_rows)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.codes.shape[0]}, block_size={self.block_size}, "
                f"awq={self.pre_quant_scale is not None}, zero_point={self.zero_point is not None}")


class FusedInt4:
    """Projections of one input as one product: the simulated weights concatenated (the modules'
    own become views of it) and one packed kernel weight. Valid while the model still holds these
    modules (``valid_for``)."""

    def __init__(self, mods: list[Int4WeightOnlyLinear]):
        self.mods = tuple(mods)
        self.weight = torch.cat([m.weight for m in mods])
        for m, w in zip(mods, self.weight.split([m.weight.shape[0] for m in mods])):
            m.weight = w
        self.bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
        first = mods[0]
        self.kernel_max_rows, self.kernel = first.kernel_max_rows, None
        if first.use_kernel:
            zero = None if first.zero_point is None else torch.cat([m.zero_point for m in mods])
            self.kernel = PackedInt4(torch.cat([m.codes for m in mods]), torch.cat([m.scale for m in mods]), zero,
                                     first.in_features, first.block_size, first.weight.dtype)

    def valid_for(self, mods: list[nn.Module]) -> bool:
        return len(mods) == len(self.mods) and all(a is b for a, b in zip(mods, self.mods))

    def __call__(self, x: Tensor) -> Tensor:
        y, path = _product(x, self.weight, self.bias, self.kernel, self.kernel_max_rows)
        for m in self.mods:
            m.last_path = path
        return y


def _product(x: Tensor, weight: Tensor, bias: Tensor | None, kernel: PackedInt4 | None,
             kernel_max_rows: int) -> tuple[Tensor, str]:
    """x·Wᵀ (+ bias) on the packed kernel when there is one for x's device and the call has at
    most ``kernel_max_rows`` rows, else on the dequantized weight; and which path ran."""
    rows = x.numel() // x.shape[-1]
    if kernel is None or rows > kernel_max_rows or x.device.type != kernel.device:
        return _linear(x, weight, bias), "simulated"
    y = kernel(x.reshape(rows, x.shape[-1])).view(*x.shape[:-1], -1)
    return (y if bias is None else y + bias), "kernel"
