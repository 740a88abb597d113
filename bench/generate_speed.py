"""Greedy generation, ~100-token prompts, 128 new tokens: evalsuite's engine against
transformers' `generate` on the same SmolLM2 weights (BF16), at batch 1 and batch 64.

    python bench/generate_speed.py [--batches 1 64] [--repeats 3]

Also measures this machine's memory read bandwidth in the same run and prints the batch-1
bandwidth floor: every decoded token reads all weights once.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from evalsuite.engine.generate import SamplingParams, generate
from evalsuite.engine.load import MODELS, gguf_to_folder, load
from evalsuite.runners.mmlu import load_mmlu
from evalsuite.taskdef import load_task

NEW_TOKENS = 128


def read_bandwidth_gbs() -> float:
    buf = torch.ones(128 * 1024 * 1024, dtype=torch.float32)  # 512 MiB, well past the caches
    buf.sum()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return buf.numel() * 4 / statistics.median(times) / 1e9


def prompts(tok, n: int) -> list[list[int]]:
    qs = load_mmlu(load_task("mmlu")).questions
    out = []
    for q in qs[::13]:
        ids = tok.encode(q.question + " " + " ".join(q.choices))
        if len(ids) >= 90:
            out.append(ids[:90 + len(out) % 20])  # 90..109 tokens
        if len(out) == n:
            return out
    raise RuntimeError("not enough long questions")


def time_it(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    lm = load("smollm2-135m", "bfloat16")
    from transformers import AutoModelForCausalLM

    folder, _ = gguf_to_folder(MODELS["smollm2-135m"].locate(), MODELS["smollm2-135m"].sha256)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    bw = read_bandwidth_gbs()
    wbytes = lm.model.resident_bytes()
    print(f"read bandwidth {bw:.1f} GB/s, weights {wbytes / 1e6:.0f} MB -> batch-1 floor {bw * 1e9 / wbytes:.1f} tok/s")
    params = SamplingParams(max_new_tokens=NEW_TOKENS)  # no stop tokens: always 128 new tokens
    for bs in args.batches:
        ps = prompts(lm.tokenizer, bs)
        generate(lm.model, ps[:1], SamplingParams(max_new_tokens=4))  # warm-up
        t_engine = time_it(lambda: generate(lm.model, ps, params, max_batch_size=bs), args.repeats)
        lens = [len(x) for x in ps]
        width = max(lens)
        ids = torch.zeros(bs, width, dtype=torch.long)
        mask = torch.zeros(bs, width, dtype=torch.long)
        for i, x in enumerate(ps):  # left padding, as transformers' generate expects
            ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1

        def hf_generate():
            with torch.inference_mode():
                hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                            do_sample=False, pad_token_id=0)

        t_hf = time_it(hf_generate, args.repeats)
        e, h = bs * NEW_TOKENS / t_engine, bs * NEW_TOKENS / t_hf
        line = f"batch {bs:3d}: engine {e:7.1f} tok/s   transformers {h:7.1f} tok/s   ratio {e / h:.2f}x"
        if bs == 1:
            line += f"   engine at {e / (bw * 1e9 / wbytes):.0%} of the bandwidth floor"
        print(line, flush=True)


if __name__ == "__main__":
    main()
