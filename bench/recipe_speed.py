"""Recipe speed on the embedded SmolLM2, each ratio against BF16 measured in the same run:

  1. MMLU letter evaluation wall time of fp8-modelopt, fp8-official, fp8-dynamic, fp8-block and
     nvfp4 (or ``--recipes``), each / bf16 (simulated FP8 and FP4; calibration excluded);
  2. calibration time of both AWQ forms (int4-awq: x̄ pass + α search; int4-awq-asym: per-layer
     scale and clip search), each on an empty calibration cache, with model loading, corpus
     sampling and the search + apply timed apart;
  3. batch-1 greedy decode speed, int4-awq (as exported, and with per-projection scales) and
     int4-awq-asym on the packed INT4 CPU kernel / bf16.

    python bench/recipe_speed.py [--per-subject 2] [--reps 3] [--only eval|awq|decode]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from evalsuite.assets import cache_dir
from evalsuite.cli import parse_recipe_spec
from evalsuite.engine.generate import DecodeBatch, Generation, SamplingParams
from evalsuite.engine.load import load
from evalsuite.models import load_model_and_recipe
from evalsuite.quant import calibrate
from evalsuite.quant.api import apply_recipe
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


def calibration_times(recipe: str) -> dict[str, float]:
    """Load, corpus sampling, and search + apply of ``recipe``, on an empty calibration cache (a
    fresh cache folder that shares only the converted model files with the real one)."""
    real = cache_dir()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "models").symlink_to(real / "models", target_is_directory=True)
        before = os.environ.get("EVALSUITE_CACHE")
        os.environ["EVALSUITE_CACHE"] = tmp
        sampled = []
        corpus = calibrate.corpus

        def timed_corpus(lm, spec):
            t = time.perf_counter()
            out = corpus(lm, spec)
            sampled.append(time.perf_counter() - t)
            return out

        calibrate.corpus = timed_corpus
        try:
            t = time.perf_counter()
            lm = load("smollm2-135m", "bfloat16")
            t_load = time.perf_counter() - t
            t = time.perf_counter()
            apply_recipe(lm, recipe)
            t_apply = time.perf_counter() - t
        finally:
            calibrate.corpus = corpus
            if before is None:
                del os.environ["EVALSUITE_CACHE"]
            else:
                os.environ["EVALSUITE_CACHE"] = before
    return {"load": t_load, "corpus": sum(sampled), "search_and_apply": t_apply - sum(sampled), "total": t_apply}


def decode_tps(recipe: str, steps: int = 64) -> float:
    """``recipe`` may carry settings: ``int4-awq:resmooth=false``."""
    name, overrides = parse_recipe_spec(recipe)
    lm, _ = load_model_and_recipe("smollm2-135m", name, "bfloat16", overrides)
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
    p.add_argument("--recipes", nargs="+", help="the recipes whose MMLU time is measured against bf16's (eval)",
                   default=["fp8-modelopt", "fp8-official", "fp8-dynamic", "fp8-block", "nvfp4"])
    args = p.parse_args()
    if args.only in (None, "eval"):
        quantized = args.recipes
        times = eval_times(["bf16", *quantized], args.per_subject, args.reps)
        med = {r: statistics.median(v) for r, v in times.items()}
        for r in quantized:
            print(f"MMLU letter ({args.per_subject}/subject), median of {args.reps}: bf16 {med['bf16']:.1f} s, "
                  f"{r} {med[r]:.1f} s -> {med[r] / med['bf16']:.2f}x (target for fp8-modelopt <= 1.3x); "
                  f"per-rep ratios {[round(f / b, 2) for b, f in zip(times['bf16'], times[r])]}")
    if args.only in (None, "awq"):
        for recipe in ("int4-awq", "int4-awq-asym"):
            t = calibration_times(recipe)
            print(f"{recipe} on an empty calibration cache: load {t['load']:.1f} s (not counted), corpus sampling "
                  f"{t['corpus']:.1f} s + search and apply {t['search_and_apply']:.1f} s = {t['total']:.1f} s "
                  "(int4-awq target <= 180 s)", flush=True)
    if args.only in (None, "decode"):
        recipes = ["bf16", "int4-awq:resmooth=false", "int4-awq", "int4-awq-asym"]
        tps: dict[str, list[float]] = {r: [] for r in recipes}
        for _ in range(args.reps):
            for r in recipes:
                tps[r].append(decode_tps(r))
        med = {r: statistics.median(v) for r, v in tps.items()}
        print(f"batch-1 decode, median of {args.reps}: " + ", ".join(
            f"{r} {med[r]:.1f} tok/s ({med[r] / med['bf16']:.2f}x)" for r in recipes) + " (target >= 2x)")


if __name__ == "__main__":
    main()
