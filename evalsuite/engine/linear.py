"""The engine's matrix product: ``F.linear`` with a BF16 route for CPUs without BF16 arithmetic.

A BF16 GEMM multiplies BF16 operands (each product exact in float32), sums in float32 and rounds
the sum once to BF16. CPUs with AVX512-BF16 or AMX do that natively. On a CPU without them (AVX2
only) torch falls back to a generic kernel at ~15 GFLOP/s against ~100 for float32 on the same
cores (docs/PERF.md), so there the engine computes the same thing itself: both operands upcast to
float32 (exact), one float32 matmul, one rounding to BF16. Only the order of the float32 additions
can differ from a native BF16 GEMM, as it already differs between BF16 kernels.

The float32 route keeps the engine's batch invariance (a sequence's numbers must not depend on
how many rows share its call). MKL's float32 GEMM works on blocks of 4 rows; below 12 rows it
sums the rows left over after the last whole block in another order. Calls of fewer than 12 rows
are therefore padded to a multiple of 4. Calls of 12 to 128 rows (the decode steps of a batch)
compute the product transposed, W·xᵀ: MKL gives it the very bits of ``F.linear`` from 12 rows
up, 1.1-1.6x faster there on SmolLM2's shapes with the conversion to BF16 included, and slower
from 256 rows on (measured on every projection shape; tests/test_linear.py; docs/PERF.md).
Upcasting a weight on every call would cost more than the product at decode sizes, so each
weight's float32 copy is kept beside it (twice the BF16 weights' memory, on these CPUs only) and
made again when the weight changes in place (its version counter moves).

Decode steps of a few rows are the exception (``decode_kernels``): there every product streams
its whole weight for one to three rows, and the padded float32 GEMM runs at a third of the speed
of the native BF16 GEMV. Small decode steps use the native kernel, as they bypass oneDNN on CPUs
that have BF16 (whose GEMV streams weights at half the speed of ATen's). So greedy decoding alone
and in a batch use different kernels and may differ in a last bit, on every CPU; scoring (prefill
and extension) never does.

GPUs need more: cuBLAS chooses a GEMM's kernel (tile shape, split-K) by its row count, so the same
row rounds differently in a call of 100 rows and one of 16,000 (0.018 nats on one prompt's
log-probability, measured on an H200; docs/PERF.md). A batch-invariant forward (scoring) therefore
runs its projections on blocks of a fixed number of rows there (``in_row_blocks``): every row goes
through the same kernel, whatever it is batched with.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROW_BLOCK, BLOCKED_BELOW = 4, 12  # see the module docstring
TRANSPOSED_ROWS = range(12, 129)  # see the module docstring
SMALL_DECODE_ROWS = 2  # decode steps with at most this many rows bypass oneDNN (measured in docs/PERF.md)
_small_decode = contextvars.ContextVar("small_decode", default=False)
# Rows per GEMM call of a batch-invariant forward, by device type: (the decoder's projections, the
# float32 lm_head of the scored rows). The CPU needs none: ``linear`` is batch-invariant there.
INVARIANT_ROW_BLOCKS: dict[str, tuple[int, int]] = {"cuda": (2048, 256)}


@contextmanager
def decode_kernels(rows: int):
    """The kernels for one decode step of ``rows`` sequences (see the module docstring)."""
    small = rows <= SMALL_DECODE_ROWS
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = not small  # only this flag; torch.backends.mkldnn.flags resets others
    token = _small_decode.set(rows < ROW_BLOCK)
    try:
        yield
    finally:
        _small_decode.reset(token)
        torch.backends.mkldnn.enabled = before


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies BF16 in hardware (AVX512-BF16 or AMX)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x·Wᵀ + b in x's dtype: float32 products (and BF16 ones on CPUs without BF16 arithmetic)
    through MKL's float32 GEMM (transposed for 12-128 rows, small calls padded) for batch
    invariance; everything else, and the few-row calls of a decode step, through ``F.linear``."""
    if x.device.type != "cpu":  # a float32 x meeting a BF16 weight (float32 logits): the weight converted
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if (_small_decode.get() or x.dtype not in (torch.float32, torch.bfloat16)
            or (x.dtype == torch.bfloat16 and cpu_has_native_bf16())):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1]).float()
    rows, w32, b32 = flat.shape[0], float32_copy(weight), None if bias is None else bias.float()
    if rows in TRANSPOSED_ROWS:
        # [rows, out], laid out column by column; the bias as addmm's C, as F.linear adds it
        y = (w32 @ flat.T if b32 is None else torch.addmm(b32[:, None], w32, flat.T)).T
    else:
        if rows < BLOCKED_BELOW and rows % ROW_BLOCK:
            flat = F.pad(flat, (0, 0, 0, ROW_BLOCK - rows % ROW_BLOCK))
        y = F.linear(flat, w32, b32)[:rows]
    return y.to(x.dtype, memory_format=torch.contiguous_format).view(*x.shape[:-1], -1)


def invariant_row_blocks(device: torch.device | str) -> tuple[int, int]:
    """(projection rows, lm_head rows) per call of a batch-invariant forward on ``device``; 0: as they come."""
    return INVARIANT_ROW_BLOCKS.get(torch.device(device).type, (0, 0))


def in_row_blocks(fn: Callable[[Tensor], Tensor], x: Tensor, block: int) -> Tensor:
    """``fn(x)`` for a row-wise ``fn`` (each output row depends on its own input row alone: a
    projection, an MLP), computed on blocks of exactly ``block`` rows, the last one padded with
    zero rows, so that every GEMM inside runs at one shape whatever the batch (see the module
    docstring); ``block`` 0 calls ``fn(x)`` as is. Blocks of 2,048 rows keep an 8B model's GEMMs
    compute-bound on a Hopper GPU; the price is the padding of the last block and one copy of
    the outputs."""
    if not block:
        return fn(x)
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    outs = []
    for lo in range(0, rows, block):
        part = flat[lo:lo + block]
        n = part.shape[0]
        if n < block:
            part = F.pad(part, (0, 0, 0, block - n))
        outs.append(fn(part)[:n])
    y = outs[0] if len(outs) == 1 else torch.cat(outs)
    return y.reshape(*x.shape[:-1], -1)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in a's dtype. BF16 on a CPU without BF16 arithmetic goes through float32 as
    ``linear`` does (exact upcasts, one float32 product, one rounding): torch's fallback BF16
    batched matmul runs there at ~1.5 GFLOP/s (the explicit attention path of quantized recipes,
    docs/PERF.md)."""
    if a.device.type == "cpu" and a.dtype == torch.bfloat16 and not cpu_has_native_bf16():
        return torch.matmul(a.float(), b.float()).to(a.dtype)
    return torch.matmul(a, b)


def float32_copy(weight: Tensor) -> Tensor:
    """``weight`` in float32, kept on the tensor and remade after an in-place change."""
    if weight.dtype == torch.float32:
        return weight
    version = None if weight.is_inference() else weight._version  # inference tensors never change
    cached = getattr(weight, "_float32_copy", None)
    if cached is None or cached[0] != version:
        with torch.no_grad():
            cached = (version, weight.detach().float())
        weight._float32_copy = cached
    return cached[1]


def project(module: nn.Module, x: Tensor) -> Tensor:
    """Call a projection: a plain ``nn.Linear`` through ``linear``; any other module (a recipe's
    quantized one), or a linear carrying forward hooks, as itself."""
    if type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks):
        return linear(x, module.weight, module.bias)
    return module(x)
