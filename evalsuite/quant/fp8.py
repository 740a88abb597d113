"""FP8 E4M3 numerics and Meta's official Llama 3.1 FP8 recipe (fbgemm_fp8), simulated in BF16.

E4M3: largest finite value 448, round to nearest even, subnormals down to 2^-9. Values are always
clamped to ±448 before the cast: torch's cast of out-of-range values differs between versions and
devices (NaN on some, saturation on others), while the deployed kernels saturate.

Simulation: every E4M3 value is exact in BF16 (3 mantissa bits against 7, and BF16's exponent
range covers 2^-9..448), so a BF16 matmul of E4M3 values with float32 accumulation computes the
products the FP8 kernel computes; the scales are applied afterwards in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.model import CausalLM
from .api import Recipe, register

E4M3_MAX = 448.0
# fbgemm's floor on a per-token scale, so an all-zero (or tiny) token never divides by zero.
MIN_SCALE = 1.0 / (E4M3_MAX * 512.0)


def round_e4m3(x: Tensor) -> Tensor:
    """Nearest E4M3 value of each element (saturating at ±448), as float32."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def per_token_scale(x: Tensor, upper_bound: float) -> Tensor:
    """fbgemm's dynamic row scale: max(min(row absmax, ub) / 448, 1 / (448 * 512)), float32 [..., 1]."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    return (amax.clamp(max=upper_bound) / E4M3_MAX).clamp(min=MIN_SCALE)


def per_channel_scale(weight: Tensor) -> Tensor:
    """Static weight scale per output channel: row absmax / 448 (floored like the token scale so an
    all-zero row stays zero instead of dividing by zero), float32 [out]."""
    return (weight.abs().amax(dim=1).float() / E4M3_MAX).clamp(min=MIN_SCALE)


class FP8RowwiseLinear(nn.Module):
    """fbgemm_fp8 linear: E4M3 weights with one static scale per output channel; each input token
    quantized to E4M3 with its own dynamic scale, bounded by ``activation_scale_ub``; output in the
    activation dtype."""

    def __init__(self, qweight: Tensor, weight_scale: Tensor, bias: Tensor | None, activation_scale_ub: float):
        super().__init__()
        self.register_buffer("qweight", qweight)  # E4M3 values, stored in the model dtype
        self.register_buffer("weight_scale", weight_scale)  # float32 [out]
        self.bias = bias
        self.activation_scale_ub = activation_scale_ub

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation_scale_ub: float) -> "FP8RowwiseLinear":
        w = linear.weight.detach()
        scale = per_channel_scale(w)
        qweight = round_e4m3(w.float() / scale[:, None]).to(w.dtype)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(qweight, scale, bias, activation_scale_ub)

    def forward(self, x: Tensor) -> Tensor:
        scale = per_token_scale(x, self.activation_scale_ub)
        xq = round_e4m3(x.float() / scale).to(x.dtype)
        y = (F.linear(xq, self.qweight).float() * scale * self.weight_scale).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        out, inp = self.qweight.shape
        return f"in_features={inp}, out_features={out}, activation_scale_ub={self.activation_scale_ub}"


@dataclass(frozen=True)
class FP8OfficialConfig:
    """Meta's Llama 3.1 FP8 recipe: FFN projections only, first and last layers left in BF16."""

    activation_scale_ub: float = 1200.0
    skip_first_and_last_layers: bool = True

    def __post_init__(self) -> None:
        if not self.activation_scale_ub > 0:
            raise ValueError(f"activation_scale_ub must be > 0, got {self.activation_scale_ub!r}")


FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def quantized_layers(num_layers: int, config: FP8OfficialConfig) -> list[int]:
    if config.skip_first_and_last_layers:
        return list(range(1, num_layers - 1))
    return list(range(num_layers))


def apply_fp8_official(model: CausalLM, config: FP8OfficialConfig) -> None:
    for i in quantized_layers(len(model.model.layers), config):
        mlp = model.model.layers[i].mlp
        for name in FFN_PROJECTIONS:
            setattr(mlp, name, FP8RowwiseLinear.from_linear(getattr(mlp, name), config.activation_scale_ub))


register(Recipe(
    "fp8-official",
    "Meta Llama 3.1 FP8 (fbgemm_fp8): FFN weights row-wise E4M3, activations per token dynamic "
    "(scale bound 1200), not in the first and last layers; attention, embeddings, lm_head, KV cache BF16",
    FP8OfficialConfig(), apply_fp8_official))
