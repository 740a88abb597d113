"""Where the engine's time goes on this CPU: operator shares of a packed prefill and of decode
steps, the number of operators per decoded token, and decode attention's two routes.

    python bench/profile_engine.py [--prefill-tokens 4096] [--batches 1 64]

Prints, for SmolLM2 in BF16: the top operators of one packed prefill (share of CPU time, and
aten::mm's achieved GFLOP/s); per decode step at each batch size, the time, the operator count
and the top operators; and one decode attention call at batch 64 against a 128-token cache
through torch's SDPA against the engine's two float32 grouped-head matmuls.
"""

from __future__ import annotations

import argparse
import time

import torch

from evalsuite.engine.generate import DecodeBatch, Generation, SamplingParams
from evalsuite.engine.load import load
from evalsuite.engine.model import Step, _decode_attention


def table(prof, rows: int = 6) -> str:
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prefill-tokens", type=int, default=4096)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = p.parse_args()
    lm = load("smollm2-135m", "bfloat16")
    cfg = lm.model.config
    n = args.prefill_tokens
    tokens = torch.randint(100, 40000, (1, n))
    step = Step.for_prefill([256] * (n // 256))
    lm.model.hidden(tokens, step)
    with torch.profiler.profile() as prof:
        t = time.perf_counter()
        lm.model.hidden(tokens, step)
        wall = time.perf_counter() - t
    mm = next(e for e in prof.key_averages() if e.key == "aten::mm")
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    flops = 2 * n * sum(o * i for _, o, i in cfg.layer_projections()) * cfg.num_layers
    print(f"prefill of {n} tokens: {wall:.2f} s; aten::mm {mm.self_cpu_time_total / total:.0%} of CPU time at "
          f"{flops / (mm.self_cpu_time_total / 1e6) / 1e9:.0f} GFLOP/s")
    print(table(prof))
    for b in args.batches:
        batch = DecodeBatch(lm.model, b, 400)
        batch.add([Generation(list(range(1000, 1100)), SamplingParams(max_new_tokens=300)) for _ in range(b)])
        for _ in range(3):
            batch.step()
        with torch.profiler.profile() as prof:
            t = time.perf_counter()
            for _ in range(4):
                batch.step()
            wall = (time.perf_counter() - t) / 4
        ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / 4
        print(f"decode step at batch {b}: {wall * 1e3:.1f} ms, {ops:.0f} aten operators per step")
        print(table(prof))
    q = torch.randn(64, cfg.num_heads, 1, cfg.head_dim).bfloat16()
    k = torch.randn(64, cfg.num_kv_heads, 128, cfg.head_dim).bfloat16()
    v = torch.randn_like(k)
    for name, fn in (("sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
                     ("engine", lambda: _decode_attention(q, k, v, None))):
        fn()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        print(f"decode attention, batch 64, 128 cached positions, {name}: {(time.perf_counter() - t) / 20 * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
