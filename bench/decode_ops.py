"""The operators one static decode step runs (what a CUDA graph replays), counted on the CPU.

    python bench/decode_ops.py                        # SmolLM2-135M's shapes, BF16, batch 1
    python bench/decode_ops.py --batch 8 --top 40

A batch-1 decode step on a GPU is hundreds of small kernels besides the GEMMs (docs/PERF.md: each
costs 1-6 µs even replayed from a graph), so every operator a layer runs shows up in its time.
This counts, with a dispatch-level hook, the operators of one captured-shape step (views, which
launch nothing, apart), per layer and in all, and lists them by count.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evalsuite.engine.config import ModelConfig  # noqa: E402
from evalsuite.engine.generate import DecodeBatch, Generation, SamplingParams  # noqa: E402

# operators that only make views (no kernel on any device)
VIEWS = {"aten.view.default", "aten.slice.Tensor", "aten.t.default", "aten.select.int", "aten._unsafe_view.default",
         "aten.transpose.int", "aten.alias.default", "aten.split.Tensor", "aten.unsqueeze.default",
         "aten.expand.default", "aten.reshape.default", "aten.squeeze.dim", "aten.permute.default"}


class Counting(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="smollm2-135m", help="an architecture preset (evalsuite models)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--top", type=int, default=25, help="list this many operators")
    args = p.parse_args()
    cfg = ModelConfig.from_name(args.shapes)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check import build_pair

    _, model = build_pair(cfg, torch.bfloat16, torch.device("cpu"))
    batch = DecodeBatch(model, args.batch, 256, static=True, prefix_cache=False)
    batch.add([Generation(list(range(2, 40 + i)), SamplingParams(max_new_tokens=50)) for i in range(args.batch)])
    batch.step()  # makes the step for this bucket and span; the counted call runs it again
    (step,) = batch._steps.values()
    with Counting() as counting:
        step()
    kernels = {op: n for op, n in counting.counts.items() if op not in VIEWS}
    total = sum(kernels.values())
    print(f"{args.shapes}, batch {args.batch}, one static decode step: {sum(counting.counts.values())} operators, "
          f"{total} of them not views ({total / cfg.num_layers:.1f} per layer over {cfg.num_layers} layers)")
    for op, n in sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{n:6d}  {op}")


if __name__ == "__main__":
    main()
