"""Micro-timings of the products the engine and the recipes use on this CPU, each against its
alternative in the same run (medians of repeated calls):

  * the BF16 product: native ``F.linear`` against the engine's float32 route (engine/linear.py)
    at 1 to 2,048 rows, and the float32 and BF16 matmul peaks (1024^3);
  * E4M3 rounding: torch's float32 -> float8_e4m3fn -> float32 cast against quantize_e4m3;
  * the FP8 simulation's product on E4M3 values: float32 matmul against a BF16 matmul, and the
    CPU's real FP8 routes (torch._scaled_mm; oneDNN's FP8 qlinear where this torch has it);
  * the packed INT4 kernel against a BF16 product on the dequantized weight at 1 to 64 rows: the
    crossover behind configs.KERNEL_MAX_ROWS;
  * the INT8 product (int8-w8a8) at 1 to 512 rows on SmolLM2's shapes, its int32 sums from
    ``torch._int_mm`` against exact float32 GEMMs on the codes (the engine's CPU route;
    the same numbers, checked here), the per-token input quantization included, against the BF16
    product of the same shape;
  * the explicit attention path's two products (quantized attention, fp8-modelopt) for one
    SmolLM2 layer at 512 tokens: torch's BF16 matmul against the engine's ``matmul``;
  * RMSNorm in BF16 over 4,096 SmolLM2 rows, in three forms: ``F.rms_norm`` with the weight
    (one rounding), transformers' two roundings through a float32 copy, and the engine's
    (``F.rms_norm`` without the weight, then times it: transformers' values, checked here).

    python bench/micro_kernels.py [--reps 20] [--only int8|attention|norm]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from evalsuite.engine import linear as engine_linear
from evalsuite.quant.fp8 import quantize_e4m3, round_e4m3, scaled_mm
from evalsuite.quant.int4 import PackedInt4, int4_block_quantize, int4_kernel_available


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def bf16_product(reps: int) -> None:
    print(f"CPU: avx512_bf16 or amx: {engine_linear.cpu_has_native_bf16()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        ms = median_ms(lambda: a @ b, 3)
        print(f"matmul 1024^3 {str(dtype).split('.')[-1]}: {2 * 1024 ** 3 / ms / 1e6:.1f} GFLOP/s")
    w = torch.randn(1536, 576).bfloat16()
    print("\nBF16 product 576 -> 1536: rows, native F.linear ms, engine route ms, ratio")
    for rows in (1, 4, 16, 64, 256, 2048):
        x = torch.randn(rows, 576).bfloat16()
        native = median_ms(lambda: F.linear(x, w), reps)
        engine_linear.float32_copy(w)
        route = median_ms(lambda: engine_linear.linear(x, w), reps)
        print(f"  {rows:5d}  {native:8.3f}  {route:8.3f}  {native / route:5.2f}x")


def e4m3(reps: int) -> None:
    x = torch.randn(2400, 576).bfloat16()
    cast = median_ms(lambda: round_e4m3(x.float() / 0.01), reps)
    fast = median_ms(lambda: quantize_e4m3(x, 0.01), reps)
    print(f"\nE4M3 rounding of 2400x576: torch cast {cast:.2f} ms, quantize_e4m3 {fast:.2f} ms ({cast / fast:.1f}x)")


def fp8_product(reps: int) -> None:
    xq = quantize_e4m3(torch.randn(2400, 576), 0.01)
    wq = quantize_e4m3(torch.randn(576, 576), 0.01)
    f32 = median_ms(lambda: F.linear(xq, wq), reps)
    xb, wb = xq.bfloat16(), wq.bfloat16()
    bf = median_ms(lambda: F.linear(xb, wb), reps)
    print(f"FP8 simulation product 2400x576x576 on E4M3 values: float32 {f32:.2f} ms, native BF16 {bf:.2f} ms")
    x = torch.randn(512, 576).bfloat16()
    w = torch.randn(1536, 576).bfloat16()
    w8 = round_e4m3(w.float() / 0.01).to(torch.float8_e4m3fn)
    base = median_ms(lambda: F.linear(x, w), reps)
    real = median_ms(lambda: scaled_mm(x, torch.tensor(0.05), w8, torch.tensor(0.01)), reps)
    print(f"512x576x1536: native BF16 linear {base:.2f} ms, CPU torch._scaled_mm (with input cast) {real:.2f} ms "
          f"({real / base:.1f}x)")


def int4_crossover(reps: int) -> None:
    if not int4_kernel_available(torch.bfloat16):
        print("\nthis torch has no packed INT4 CPU kernel")
        return
    print("\nINT4 packed kernel against the BF16 product on the dequantized weight (the engine's route):")
    print("  shape, rows, kernel ms, BF16 ms, kernel speed-up")
    for out in (576, 3072):
        w = torch.randn(out, 576) * 0.05
        codes, scale = int4_block_quantize(w, 128)
        packed = PackedInt4(codes, scale, None, 576, 128, torch.bfloat16)
        wb = w.bfloat16()
        engine_linear.float32_copy(wb)
        for rows in (1, 2, 4, 8, 16, 64):
            x = torch.randn(rows, 576).bfloat16()
            k = median_ms(lambda: packed(x), reps)
            with engine_linear.decode_kernels(rows):
                d = median_ms(lambda: engine_linear.linear(x, wb), reps)
            print(f"  {out}x576  {rows:3d}  {k:7.3f}  {d:7.3f}  {d / k:5.2f}x")


def int8_products(reps: int) -> None:
    from evalsuite.quant.int8 import Int8W8A8Linear

    print("\nINT8 W8A8 product (input quantization included): ms, int32 sums by torch._int_mm / by float32 GEMMs, "
          "and the BF16 product of the same shape (the engine's route)")
    print("  shape, rows, _int_mm ms, float32 ms, BF16 ms, float32 / BF16")
    for out, inp in ((1536, 576), (576, 1536)):
        codes = torch.randint(-128, 128, (out, inp), dtype=torch.int8)
        m = Int8W8A8Linear(codes, torch.rand(out) / 100, None, torch.bfloat16)
        wb = (codes.float() / 100).bfloat16()
        engine_linear.float32_copy(wb)
        for rows in (1, 4, 64, 512):
            x = torch.randn(rows, inp).bfloat16()
            m.kernel = "int_mm"
            a, ya = median_ms(lambda: m(x), reps), m(x)
            m.kernel = "off"
            b, yb = median_ms(lambda: m(x), reps), m(x)
            assert torch.equal(ya, yb), "the two routes differ"
            with engine_linear.decode_kernels(rows) if rows <= 4 else contextlib.nullcontext():  # decode / scoring
                d = median_ms(lambda: engine_linear.linear(x, wb), reps)
            print(f"  {out}x{inp}  {rows:4d}  {a:8.3f}  {b:8.3f}  {d:8.3f}  {b / d:5.2f}x")


def attention_products(reps: int) -> None:
    """SmolLM2's 9 query heads over 3 KV heads (3 per group), head dim 64, 512 tokens."""
    q = torch.randn(1, 3, 3 * 512, 64).bfloat16()
    k = torch.randn(1, 3, 512, 64).bfloat16()
    probs = torch.rand(1, 3, 3 * 512, 512).bfloat16()
    print("explicit attention, one layer at 512 tokens: ms (BF16 torch.matmul / engine matmul)")
    for name, a, b in (("q·kᵀ", q, k.transpose(-1, -2)), ("probs·v", probs, k)):
        native = median_ms(lambda: torch.matmul(a, b), reps)
        engine = median_ms(lambda: engine_linear.matmul(a, b), reps)
        print(f"  {name:8s} {native:8.2f} {engine:8.2f}  {native / engine:5.1f}x")


def norms(reps: int) -> None:
    x = (torch.randn(4096, 576) * 4).bfloat16()
    w = torch.randn(576).bfloat16()
    forms = {"F.rms_norm with the weight": lambda: F.rms_norm(x, w.shape, w, 1e-5),
             "transformers' (float32 copy)": lambda: (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True)
                                                                              + 1e-5)).to(torch.bfloat16) * w,
             "the engine's": lambda: F.rms_norm(x, w.shape, None, 1e-5) * w}
    same = torch.equal(forms["the engine's"](), forms["transformers' (float32 copy)"]())
    times = {name: median_ms(fn, reps) for name, fn in forms.items()}
    engine = times["the engine's"]
    print(f"RMSNorm, BF16, 4096 x 576: ms ({'the engine equals' if same else 'the engine DIFFERS from'} transformers)")
    for name, t in times.items():
        print(f"  {name:30s} {t:7.2f}  {t / engine:5.2f}x the engine's")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--only", choices=("int8", "attention", "norm"), default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    with torch.inference_mode():
        if args.only is None:
            bf16_product(args.reps)
            e4m3(args.reps)
            fp8_product(args.reps)
            int4_crossover(args.reps)
        if args.only in (None, "int8"):
            int8_products(args.reps)
        if args.only in (None, "attention"):
            attention_products(args.reps)
        if args.only in (None, "norm"):
            norms(args.reps)


if __name__ == "__main__":
    main()
