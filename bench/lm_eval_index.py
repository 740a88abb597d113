"""Time the lm-eval task index a run needs for a built-in task: lm-eval's own TaskManager (every
built-in task file parsed) against evalsuite's (the built-in index cached, ours parsed), cold and
warm, in one process. Usage: python bench/lm_eval_index.py [--repeats 3]"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ["EVALSUITE_CACHE"] = tempfile.mkdtemp(prefix="lm-eval-index-")
    from lm_eval.tasks import TaskManager

    from evalsuite.runners.lm_eval_harness import task_manager
    from evalsuite.taskdef import TASKS_DIR

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    cold = timed(lambda: task_manager(["arc_easy", "mmlu"]))
    full, cached = [], []
    for _ in range(args.repeats):
        full.append(timed(lambda: TaskManager(include_path=[str(TASKS_DIR / "lm_eval")])))
        cached.append(timed(lambda: task_manager(["arc_easy", "mmlu"])))
    f, c = statistics.median(full), statistics.median(cached)
    print(f"lm-eval TaskManager (full build), median of {args.repeats}: {f:.2f} s")
    print(f"evalsuite task_manager, cold cache (builds and stores the index): {cold:.2f} s")
    print(f"evalsuite task_manager, cached, median of {args.repeats}: {c:.2f} s  ({f / c:.1f}x faster)")


if __name__ == "__main__":
    main()
