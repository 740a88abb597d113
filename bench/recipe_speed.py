"""Recipe speed on the embedded SmolLM2, each ratio against BF16 measured in the same run:

  1. MMLU letter evaluation wall time, fp8-modelopt / bf16 and fp8-official / bf16 (simulated FP8;
     calibration excluded);
  2. AWQ calibration and search time for int4-awq (corpus sampling + x̄ pass + α search);
  3. batch-1 greedy decode speed, int4-awq and int4-awq-asym on the packed INT4 CPU kernel / bf16.

    python bench/recipe_speed.py [--per-subject 2] [--reps 3] [--only eval|awq|decode]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

from evalsuite.engine.generate import DecodeBatch, Generation, SamplingParams
from evalsuite.models import load_model_and_recipe
from evalsuite.runners.mmlu import MMLUConfig, run_mmlu


def eval_times(recipes: list[str], per_subject: int, reps: int) -> dict[str, list[float]]:
    """MMLU letter wall time per recipe, the recipes taking turns ``reps`` times (load and
    calibration excluded), so that a change in the machine's load hits them alike."""
    models = {r: load_model_and_recipe("smollm2-135m", r, "bfloat16") for r in recipes}
    times: dict[str, list[float]] = {r: [] for r in recipes}
    for _ in range(reps):
        for r, (lm, record) in models.items():
            out = tempfile.mkdtemp()
            t = time.perf_counter()
            run_mmlu(lm, MMLUConfig(formulations=("letter",), per_subject=per_subject), out, recipe=record,
                     progress=False)
            times[r].append(time.perf_counter() - t)
            shutil.rmtree(out)
    return times


def decode_tps(recipe: str, steps: int = 64) -> float:
    lm, _ = load_model_and_recipe("smollm2-135m", recipe, "bfloat16")
    batch = DecodeBatch(lm.model, 1, 400)
    batch.add([Generation(list(range(1000, 1100)), SamplingParams(max_new_tokens=300))])
    for _ in range(4):
        batch.step()
    t = time.perf_counter()
    for _ in range(steps):
        batch.step()
    return steps / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-subject", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", choices=("eval", "awq", "decode"), default=None)
    args = p.parse_args()
    if args.only in (None, "eval"):
        times = eval_times(["bf16", "fp8-modelopt", "fp8-official"], args.per_subject, args.reps)
        med = {r: statistics.median(v) for r, v in times.items()}
        for r in ("fp8-modelopt", "fp8-official"):
            print(f"MMLU letter ({args.per_subject}/subject), median of {args.reps}: bf16 {med['bf16']:.1f} s, "
                  f"{r} {med[r]:.1f} s -> {med[r] / med['bf16']:.2f}x (target for fp8-modelopt <= 1.3x); "
                  f"per-rep ratios {[round(f / b, 2) for b, f in zip(times['bf16'], times[r])]}")
    if args.only in (None, "awq"):
        t = time.perf_counter()
        load_model_and_recipe("smollm2-135m", "int4-awq", "bfloat16")
        print(f"int4-awq calibration + search + apply: {time.perf_counter() - t:.1f} s (target <= 180 s; "
              "a second run reads the cached search)")
    if args.only in (None, "decode"):
        recipes = ["bf16", "int4-awq", "int4-awq-asym"]
        tps: dict[str, list[float]] = {r: [] for r in recipes}
        for _ in range(args.reps):
            for r in recipes:
                tps[r].append(decode_tps(r))
        med = {r: statistics.median(v) for r, v in tps.items()}
        print(f"batch-1 decode, median of {args.reps}: " + ", ".join(
            f"{r} {med[r]:.1f} tok/s ({med[r] / med['bf16']:.2f}x)" for r in recipes) + " (target >= 2x)")


if __name__ == "__main__":
    main()
