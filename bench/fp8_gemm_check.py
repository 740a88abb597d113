"""FP8 GEMM check for a Hopper GPU (or the CPU): torch._scaled_mm against the BF16 simulation.

For the projection shapes of Llama-3.1-8B (or SmolLM2-135M) with random weights, at several row
counts: parity of the real FP8 GEMM with the simulated path (relative error, must be < 1e-2),
and time per call of BF16 F.linear, per-tensor FP8 (fp8-modelopt) and row-wise FP8 (fp8-official).
No weights are needed.

    python bench/fp8_gemm_check.py --device cuda --shapes llama-3.1-8b
    python bench/fp8_gemm_check.py --device cpu --shapes smollm2-135m --rows 1 16   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from evalsuite.engine.config import ModelConfig
from evalsuite.quant.fp8 import FP8RowwiseLinear, FP8StaticLinear


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of the fused projections."""
    return {"qkv": (cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size), "o": (cfg.q_size, cfg.hidden_size),
            "gate_up": (cfg.hidden_size, 2 * cfg.intermediate_size), "down": (cfg.intermediate_size, cfg.hidden_size)}


def timed(fn, device: str, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="llama-3.1-8b")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256, 2048])
    args = p.parse_args()
    dev = args.device
    print(f"device {dev}: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}; torch {torch.__version__}")
    torch.manual_seed(0)
    worst = 0.0
    print(f"{'proj':8} {'rows':>5} {'bf16 us':>9} {'fp8 tensor us':>14} {'fp8 row us':>11} {'rel err':>8}")
    for name, (k, n) in projection_shapes(ModelConfig.from_name(args.shapes)).items():
        lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, std=k ** -0.5)
        static = FP8StaticLinear.from_linear(lin, input_amax=4.0).to(dev)
        rowwise = FP8RowwiseLinear.from_linear(lin, 1200.0).to(dev)
        w = lin.weight.to(dev)
        for m in args.rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            errs = []
            for q in (static, rowwise):
                q.use_kernel = False
                sim = q(x).float()
                q.use_kernel = True
                real = q(x).float()
                errs.append(float((real - sim).norm() / sim.norm()))
            t_bf16 = timed(lambda: F.linear(x, w), dev)
            t_static = timed(lambda: static(x), dev)
            t_row = timed(lambda: rowwise(x), dev)
            worst = max(worst, *errs)
            print(f"{name:8} {m:5d} {t_bf16 * 1e6:9.1f} {t_static * 1e6:14.1f} {t_row * 1e6:11.1f} {max(errs):8.1e}")
    print(f"worst relative error real vs simulated: {worst:.2e} ({'PASS' if worst < 1e-2 else 'FAIL'}, limit 1e-2)")


if __name__ == "__main__":
    main()
