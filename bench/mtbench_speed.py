"""MT-Bench answer generation on the embedded SmolLM2 (BF16): every question of a turn in one
batch through the engine (in-flight batching), against the same answers generated one question
at a time (target: >= 5x), with FastChat's temperatures and per-question seeds, so both produce
the same answers (checked).

    python bench/mtbench_speed.py [--questions 80] [--max-new-tokens 1024] [--sequential 8]

One at a time is timed on ``--sequential`` questions spread evenly over the list (both turns) and
its rate in output tokens/s compared with the batched run's rate over all questions. Both start
with an empty prefix cache (engine.prefix: a second turn reuses its first turn's K/V); the batched
run is timed without it too (``--reps``: both, in turns), and the share of prompt tokens reused
is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

from evalsuite.backends.engine import EngineBackend
from evalsuite.engine.load import load
from evalsuite.engine.prefix import clear
from evalsuite.runners.mtbench import MTBenchConfig, conversation, prepare_mtbench, sampling_for


def answers(backend, job, questions, one_at_a_time: bool) -> tuple[dict, int, float]:
    out, tokens = {}, 0
    t0 = time.perf_counter()
    for turn in (1, 2):
        prompts = [conversation(q, [out.get((q["question_id"], 1), "")], turn) for q in questions]
        params = [sampling_for(job.task, q, turn, 0, job.max_new_tokens) for q in questions]
        if one_at_a_time:
            results = [backend.generate([p], [sp])[0] for p, sp in zip(prompts, params)]
        else:
            results = backend.generate(prompts, params)
        for q, r in zip(questions, results):
            out[(q["question_id"], turn)] = r.text
            tokens += len(r.tokens)
    return out, tokens, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--questions", type=int, default=80)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--sequential", type=int, default=8)
    p.add_argument("--reps", type=int, default=1, help="batched runs with and without the prefix cache, in turns")
    args = p.parse_args()
    job = prepare_mtbench(MTBenchConfig(questions=args.questions, max_new_tokens=args.max_new_tokens))
    lm = load("smollm2-135m", "bfloat16")
    backends = {"prefix cache": EngineBackend(lm, max_batch_size=len(job.questions)),
                "no prefix cache": EngineBackend(lm, max_batch_size=len(job.questions), prefix_cache=False)}
    rates: dict[str, list[float]] = {name: [] for name in backends}
    print(f"MT-Bench answers, {len(job.questions)} questions x 2 turns, up to {args.max_new_tokens} new tokens (BF16):")
    for rep in range(args.reps):
        for name, backend in backends.items():
            clear(lm.model)
            out, n, t = answers(backend, job, job.questions, False)
            rates[name].append(n / t)
            if rep == 0 and name == "prefix cache":
                batched, stats = out, clear(lm.model).stats
            print(f"  batched (one call per turn), {name}: {n} tokens in {t:.1f} s = {n / t:.1f} tok/s")
    print(f"  prefix cache: {stats['reused_tokens']} of {stats['prompt_tokens']} prompt tokens reused; "
          f"with / without, per rep: {', '.join(f'{a / b:.2f}x' for a, b in zip(*rates.values()))}")
    # one question in every len/sequential: every category, not the first (writing) questions only
    sample = job.questions[::max(1, len(job.questions) // args.sequential)][:args.sequential]
    clear(lm.model)
    alone, n_s, t_s = answers(backends["prefix cache"], job, sample, True)
    same = sum(alone[k] == batched[k] for k in alone)
    rate = statistics.median(rates["prefix cache"])
    print(f"  one question at a time ({len(sample)} questions, prefix cache): {n_s} tokens in {t_s:.1f} s = "
          f"{n_s / t_s:.1f} tok/s")
    print(f"  batched (median, prefix cache) / one at a time: {rate / (n_s / t_s):.2f}x (target >= 5x); "
          f"identical answers {same}/{len(alone)}")

if __name__ == "__main__":
    main()
