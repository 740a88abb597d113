"""Recipe speed on the embedded SmolLM2, each ratio against BF16 measured in the same run:

  1. MMLU letter evaluation wall time, fp8-modelopt / bf16 (simulated FP8; calibration excluded);
  2. AWQ calibration and search time for int4-awq (corpus sampling + x̄ pass + α search);
  3. batch-1 greedy decode speed, int4-awq on the packed INT4 CPU kernel / bf16.

    python bench/recipe_speed.py [--per-subject 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from evalsuite.engine.generate import DecodeBatch, Generation, SamplingParams
from evalsuite.quant.checkpoint import load_model_and_recipe
from evalsuite.runners.mmlu import MMLUConfig, run_mmlu


def eval_time(recipe: str, per_subject: int) -> tuple[float, float]:
    t = time.perf_counter()
    lm, record = load_model_and_recipe("smollm2-135m", recipe, "bfloat16")
    t_apply = time.perf_counter() - t
    out = tempfile.mkdtemp()
    t = time.perf_counter()
    run_mmlu(lm, MMLUConfig(formulations=("letter",), per_subject=per_subject), out, recipe=record, progress=False)
    t_eval = time.perf_counter() - t
    shutil.rmtree(out)
    return t_apply, t_eval


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
    args = p.parse_args()
    _, bf16_eval = eval_time("bf16", args.per_subject)
    fp8_apply, fp8_eval = eval_time("fp8-modelopt", args.per_subject)
    print(f"MMLU letter ({args.per_subject}/subject): bf16 {bf16_eval:.1f} s, fp8-modelopt {fp8_eval:.1f} s "
          f"-> {fp8_eval / bf16_eval:.2f}x (target <= 1.3x); fp8-modelopt calibration+apply {fp8_apply:.1f} s")
    t = time.perf_counter()
    load_model_and_recipe("smollm2-135m", "int4-awq", "bfloat16")
    print(f"int4-awq calibration + search + apply: {time.perf_counter() - t:.1f} s (target <= 180 s; "
          "a second run reads the cached search)")
    bf16, int4 = decode_tps("bf16"), decode_tps("int4-awq")
    print(f"batch-1 decode: bf16 {bf16:.1f} tok/s, int4-awq (kernel) {int4:.1f} tok/s -> {int4 / bf16:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
