"""What the HTTP layer and in-flight batching cost and buy, on the embedded SmolLM2 (BF16):

  1. generation: N clients at once against ``evalsuite serve`` (greedy, ~100-token prompts, 128
     new tokens each) against the same requests sent one at a time, and against in-process
     ``generate`` of the same prompts at batch N (targets: >= 5x one-at-a-time, >= 85% of
     in-process);
  2. MMLU letter + cloze on a stratified subset through the endpoint backend against the
     suite's server, against the in-process runner (target: <= 1.5x the in-process wall time),
     with the share of identical predictions.

    python bench/serve_speed.py [--clients 64] [--new-tokens 128] [--per-subject 5] [--repeats 1]
                               [--only gen|mmlu]

The server runs in this process on 127.0.0.1 (uvicorn in a thread; the model is shared, not
copied); clients use the real ``openai`` client.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from evalsuite.backends.engine import EngineBackend
from evalsuite.backends.openai import OpenAIBackend
from evalsuite.engine.generate import SamplingParams, generate
from evalsuite.engine.load import load
from evalsuite.runners.mmlu import MMLUConfig, run_mmlu
from evalsuite.server.serve import BackgroundServer, served_model

WORDS = ("river mountain history science music garden ocean city market winter light language machine "
         "forest bridge letter window animal planet story").split()


def prompts(tokenizer, n: int, length: int = 100) -> list[list[int]]:
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(length)]
        out.append(tokenizer.encode(" ".join(words))[:length])
    return out


def generation(lm, clients: int, new_tokens: int) -> None:
    ps = prompts(lm.tokenizer, clients)
    params = SamplingParams(max_new_tokens=new_tokens)  # no stop token: every request makes new_tokens
    generate(lm.model, ps[:2], SamplingParams(max_new_tokens=4))  # warm-up
    t = time.perf_counter()
    generate(lm.model, ps, params, max_batch_size=clients)
    t_local = time.perf_counter() - t
    total = clients * new_tokens
    with BackgroundServer(served_model(lm, {"name": "bf16"}, "smol", max_batch_size=clients, max_len=512)) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", timeout=3600, max_retries=0)

        def ask(p):
            r = client.completions.create(model="smol", prompt=[p], max_tokens=new_tokens, temperature=0,
                                          extra_body={"ignore_eos": True})
            return r.usage.completion_tokens

        ask(ps[0])
        t = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            made = sum(pool.map(ask, ps))
        t_conc = time.perf_counter() - t
        seq_n = max(4, clients // 8)  # one at a time: a sample of the prompts, rate extrapolated
        t = time.perf_counter()
        seq_made = sum(ask(p) for p in ps[:seq_n])
        t_seq = time.perf_counter() - t
    conc, seq, local = made / t_conc, seq_made / t_seq, total / t_local
    print(f"generation, {clients} prompts x {new_tokens} new tokens (greedy, BF16):")
    print(f"  in-process generate at batch {clients}: {local:7.1f} tok/s ({t_local:.1f} s)")
    print(f"  {clients} concurrent clients via HTTP:       {conc:7.1f} tok/s ({t_conc:.1f} s, {made} tokens)")
    print(f"  one request at a time via HTTP ({seq_n} of them): {seq:7.1f} tok/s")
    print(f"  concurrent / one at a time: {conc / seq:.2f}x (target >= 5x); concurrent / in-process: "
          f"{conc / local:.1%} (target >= 85%)")


def mmlu(lm, per_subject: int, repeats: int) -> None:
    """In-process and endpoint runs take turns ``repeats`` times (this machine's speed drifts);
    the median ratio is the result."""
    cfg = MMLUConfig(formulations=("letter", "cloze"), per_subject=per_subject)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp, BackgroundServer(served_model(
            lm, {"name": "bf16"}, "smol", max_len=2048, max_prefill_tokens=4096)) as srv:
        for rep in range(repeats):
            t = time.perf_counter()
            run_mmlu(EngineBackend(lm, max_batch_size=32), cfg, Path(tmp) / f"local{rep}", progress=False)
            t_local = time.perf_counter() - t
            backend = OpenAIBackend(srv.base_url, "smol", tokenizer=lm.tokenizer, concurrency=32, timeout=600)
            t = time.perf_counter()
            run_mmlu(backend, cfg, Path(tmp) / f"remote{rep}", progress=False)
            t_remote = time.perf_counter() - t
            recs = {}
            for name in ("local", "remote"):
                recs[name] = {(r["formulation"], r["id"]): r["prediction"]
                              for r in map(json.loads, open(Path(tmp) / f"{name}{rep}" / "samples.jsonl"))}
            same = sum(recs["remote"].get(k) == v for k, v in recs["local"].items())
            ratios.append(t_remote / t_local)
            print(f"MMLU letter + cloze, {per_subject}/subject ({len(recs['local'])} scored pairs): in-process "
                  f"{t_local:.1f} s, through the endpoint {t_remote:.1f} s -> {ratios[-1]:.2f}x; "
                  f"identical predictions {same}/{len(recs['local'])}", flush=True)
    print(f"median endpoint / in-process over {repeats} run(s): {statistics.median(ratios):.2f}x (target <= 1.5x)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--per-subject", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1, help="MMLU: in-process and endpoint runs, taking turns")
    p.add_argument("--only", choices=("gen", "mmlu"), default=None)
    args = p.parse_args()
    lm = load("smollm2-135m", "bfloat16")
    if args.only in (None, "gen"):
        generation(lm, args.clients, args.new_tokens)
    if args.only in (None, "mmlu"):
        mmlu(lm, args.per_subject, args.repeats)


if __name__ == "__main__":
    main()
