"""Any lm-eval task through the suite: ``evalsuite run --harness lm-eval --task NAME [...]``.

lm-eval builds the requests and computes the metrics; the model is the suite's backend (the
engine under any recipe, or an endpoint) through ``EvalsuiteLM``. The run folder gets the suite's
own records, so comparisons and reports read it like any run: ``samples.jsonl`` (one record per
task, document and filter: lm-eval's sample with its responses and per-sample metrics) and
``run.json`` (tasks, lm-eval's task configs, versions, groups and metric directions, model,
recipe, metrics). ``evalsuite compare`` pairs two such runs document by document. lm-eval's response cache
(a SQLite file in the run folder) makes a rerun skip the model calls already answered.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ..backends.base import Backend
from ..records import RunStore, package_versions
from .base import RunResult


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's task index holding ``tasks`` (ours first: indexing lm-eval's thousands of built-in
    task files takes seconds); a KeyError naming the unknown ones. Called before a model loads."""
    from lm_eval.tasks import TaskManager

    from ..taskdef import TASKS_DIR

    path = include_path or str(TASKS_DIR / "lm_eval")
    manager = TaskManager(include_path=path, include_defaults=False)
    if any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise KeyError(f"unknown lm-eval tasks {unknown}; `lm-eval ls tasks` lists them (the offline MMLU: "
                       "evalsuite_mmlu, evalsuite_mmlu_continuation and their subjects)")
    return manager


def run_lm_eval(backend: Backend, tasks: list[str], out_dir: str | Path, *, limit: float | None = None,
                num_fewshot: int | None = None, include_path: str | None = None, seed: int = 1234,
                manager=None) -> RunResult:
    """``manager``: from ``task_manager`` (built here when not given)."""
    import lm_eval

    from .lm_eval_model import EvalsuiteLM

    out = Path(out_dir)
    manager = manager or task_manager(tasks, include_path)
    ident = backend.identity()
    identity = {"task": "lm-eval", "config": {"tasks": sorted(tasks), "limit": limit, "num_fewshot": num_fewshot,
                                              "seed": seed},
                "model": ident.get("model"), "recipe": ident.get("recipe"), "backend_kind": ident.get("kind")}
    config_hash = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    store = RunStore(out, identity, config_hash, key=lambda r: r["id"])
    store.run["backend"] = backend.describe()
    store.run["versions"] = package_versions()
    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=EvalsuiteLM(backend=backend), tasks=tasks, limit=limit, num_fewshot=num_fewshot, log_samples=True,
        task_manager=manager, use_cache=str(out / "lm_eval_cache"), random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)
    done = store.done_keys()
    records = []
    for task, samples in results["samples"].items():
        for s in samples:  # one per document and filter (a task with several filters logs each)
            rid = f"{task}/{s['doc_id']}" + ("" if s.get("filter", "none") == "none" else f"/{s['filter']}")
            if rid not in done:
                records.append({"id": rid, "task": task, **json.loads(json.dumps(s, default=str))})
    store.append(records)
    store.run["lm_eval"] = {"configs": json.loads(json.dumps(results.get("configs", {}), default=str)),
                            "versions": results.get("versions", {}), "n-samples": results.get("n-samples", {}),
                            "group_subtasks": results.get("group_subtasks", {}),
                            "higher_is_better": results.get("higher_is_better", {})}
    metrics = json.loads(json.dumps(results["results"], default=str))
    metrics = {**{t: metrics[t] for t in tasks if t in metrics}, **metrics}  # the tasks asked for first
    store.finish(metrics=metrics, timings={"lm-eval": time.perf_counter() - t0}, usage=backend.usage())
    return RunResult(out, metrics, store.run)


def format_lm_eval_summary(metrics: dict[str, Any]) -> str:
    lines = []
    for task, m in metrics.items():  # the tasks asked for first (run_lm_eval)
        values = ", ".join(f"{k.removesuffix(',none')} {v:.4f}" for k, v in m.items()
                           if isinstance(v, float) and not k.split(",")[0].endswith("_stderr"))
        lines.append(f"{task}: {values}")
    return "\n".join(lines)
