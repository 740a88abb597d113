"""Batch-1 greedy decode, eager against torch.compile (inductor, dynamic shapes), per recipe.

    python bench/compile_decode.py bf16 int4-awq-asym

The whole decode step (decoder and lm_head) is compiled as one function; the first steps pay for
compilation (about two minutes per recipe on 2 cores). Prints tokens/s of 3 x 32 steps for each
mode and whether both modes chose the same tokens. The engine runs eager: on the 2-core Zen 4 the
compiled step was the slower one (docs/PERF.md).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from evalsuite.engine.generate import DecodeBatch, Generation, SamplingParams
from evalsuite.engine.linear import decode_kernels
from evalsuite.engine.model import Step
from evalsuite.models import load_model_and_recipe


def decode_run(recipe: str, compiled: bool, steps: int = 32, reps: int = 3) -> tuple[list[float], list[int]]:
    lm, _ = load_model_and_recipe("smollm2-135m", recipe, "bfloat16")
    m = lm.model

    def decode(tokens: torch.Tensor, step: Step) -> torch.Tensor:
        return m.logits(m.hidden(tokens, step)[:, 0]).float()

    fn = torch.compile(decode, dynamic=True) if compiled else decode
    batch = DecodeBatch(m, 1, 400)
    g = Generation(list(range(1000, 1100)), SamplingParams(max_new_tokens=300))
    batch.add([g])
    chosen: list[int] = []

    def step() -> None:
        tokens = torch.tensor([[chosen[-1] if chosen else g.tokens[-1]]])
        positions = torch.tensor([len(g.prompt) + len(chosen)])
        with torch.inference_mode(), decode_kernels(1):  # as DecodeBatch.step at one row
            logits = fn(tokens, Step.for_decode(positions, batch.cache))
        chosen.append(int(logits.argmax()))

    for _ in range(4):  # warm-up (and compilation)
        step()
    tps = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        tps.append(steps / (time.perf_counter() - t))
    return tps, chosen


def main() -> None:
    for recipe in sys.argv[1:] or ["bf16", "int4-awq-asym"]:
        eager, a = decode_run(recipe, False)
        comp, b = decode_run(recipe, True)
        same = sum(x == y for x, y in zip(a, b))
        print(f"{recipe}: eager {statistics.median(eager):.1f} tok/s, compiled {statistics.median(comp):.1f} tok/s "
              f"-> {statistics.median(comp) / statistics.median(eager):.2f}x; same tokens {same}/{len(a)}", flush=True)


if __name__ == "__main__":
    main()
