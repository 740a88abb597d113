"""Where the engine's time goes on this CPU: operator shares of a packed prefill and of decode
steps, the number of operators per decoded token, and decode attention's two routes.

    python bench/profile_engine.py [--prefill-tokens 4096] [--batches 1 64] [--context 100]

Prints, for SmolLM2 in BF16: the top operators of one packed prefill (share of CPU time, and
aten::mm's achieved GFLOP/s); per decode step at each batch size, the time, the operator count
and the top operators, each sequence holding ``--context`` tokens (MT-Bench's second turns
hold 300-1,000); and one decode attention call at the largest batch against that cache through
torch's SDPA with its GQA expansion against the engine's grouped-head call.
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
    p.add_argument("--context", type=int, default=100)
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
        batch = DecodeBatch(lm.model, b, args.context + 300)
        batch.add([Generation(list(range(1000, 1000 + args.context)), SamplingParams(max_new_tokens=300))
                   for _ in range(b)])
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
    b, n = max(args.batches), args.context
    q = torch.randn(b, cfg.num_heads, 1, cfg.head_dim).bfloat16()
    k = torch.randn(b, cfg.num_kv_heads, n, cfg.head_dim).bfloat16()
    v = torch.randn_like(k)
    for name, fn in (("sdpa, GQA expanded", lambda: torch.nn.functional.scaled_dot_product_attention(
                          q, k, v, enable_gqa=True)),
                     ("engine, grouped", lambda: _decode_attention(q, k, v, None))):
        fn()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        ms = (time.perf_counter() - t) / 20 * 1e3
        print(f"decode attention, batch {b}, {n} cached positions, {name}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
