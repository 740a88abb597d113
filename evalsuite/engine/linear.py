"""The engine's matrix product: ``F.linear`` with a BF16 route for CPUs without BF16 arithmetic.

A BF16 GEMM multiplies BF16 operands (each product exact in float32), sums in float32 and rounds
the sum once to BF16. CPUs with AVX512-BF16 or AMX do that natively. On a CPU without them (AVX2
only) torch falls back to a generic kernel at ~15 GFLOP/s against ~100 for float32 on the same
cores (docs/PERF.md), so there the engine computes the same thing itself: both operands upcast to
float32 (exact), one float32 matmul, one rounding to BF16. Only the order of the float32 additions
can differ from a native BF16 GEMM, as it already differs between BF16 kernels.

Calls of fewer than ``UPCAST_MIN_ROWS`` rows (batch-1 decode) stay native: there the weight's
upcast would cost more than the product it speeds up.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

UPCAST_MIN_ROWS = 4  # measured: at 4 rows the two routes cost the same on an AVX2 core (docs/PERF.md)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies BF16 in hardware (AVX512-BF16 or AMX)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x·Wᵀ + b in x's dtype (see the module docstring for the BF16 route on AVX2-only CPUs)."""
    if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1]
            and not cpu_has_native_bf16()):
        y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return y.to(torch.bfloat16)
    return F.linear(x, weight, bias)


def project(module: nn.Module, x: Tensor) -> Tensor:
    """Call a projection: a plain ``nn.Linear`` through ``linear``; any other module (a recipe's
    quantized one), or a linear carrying forward hooks, as itself."""
    if type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks):
        return linear(x, module.weight, module.bias)
    return module(x)
