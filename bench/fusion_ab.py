"""q/k/v and gate/up fused against apart, in one process: one forward of the embedded SmolLM2
under a recipe, the two alternating ``--reps`` times; prints the medians and their ratio.

    python bench/fusion_ab.py --recipe fp8-dynamic --batch 8 --length 80 [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from evalsuite.models import load_model_and_recipe


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="fp8-dynamic")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    lm, _ = load_model_and_recipe("smollm2-135m", args.recipe, "bfloat16")
    layers = lm.model.model.layers
    fused = [(layer.self_attn._fused, layer.mlp._fused) for layer in layers]
    tokens = torch.randint(0, lm.model.config.vocab_size, (args.batch, args.length),
                           generator=torch.Generator().manual_seed(0))

    def forward(on: bool) -> float:
        for layer, (attn, mlp) in zip(layers, fused):
            layer.self_attn._fused, layer.mlp._fused = (attn, mlp) if on else (None, None)
        start = time.perf_counter()
        with torch.no_grad():
            lm.model(tokens)
        return time.perf_counter() - start

    forward(True), forward(False)  # warm-up
    together, apart = [], []
    for _ in range(args.reps):
        together.append(forward(True))
        apart.append(forward(False))
    print(f"{args.recipe}, {args.batch} x {args.length} tokens, median of {args.reps}: fused "
          f"{statistics.median(together):.3f} s, apart {statistics.median(apart):.3f} s, fused / apart "
          f"{statistics.median(together) / statistics.median(apart):.3f}; per-rep "
          f"{[round(a / b, 3) for a, b in zip(together, apart)]}")


if __name__ == "__main__":
    main()
