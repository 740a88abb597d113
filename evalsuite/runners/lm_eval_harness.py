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
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..backends.base import Backend
from ..records import RunConflictError, RunStore, package_versions
from .base import RunResult, backend_identity


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's task index holding ``tasks``: its built-in tasks, ours (tasks/lm_eval: the offline
    MMLU) and those in ``include_path``. A KeyError names the unknown ones, with the names closest
    to each. Called before a model loads. Indexing lm-eval's thousands of built-in task files takes
    seconds, so the tasks of ours and of the include path are looked up first, and a name in
    neither is checked against the names of the built-in tasks, cached once per lm-eval install."""
    from lm_eval.tasks import TaskManager

    from ..taskdef import TASKS_DIR

    paths = [str(TASKS_DIR / "lm_eval")] + ([include_path] if include_path else [])
    own = TaskManager(include_path=paths, include_defaults=False)
    missing = [t for t in tasks if t not in own.all_tasks]
    if not missing:
        return own
    full = None
    builtin = _cached_builtin_tasks()
    if builtin is None:
        # From the full index when no task file of the user's could shadow a built-in name
        full = TaskManager(include_path=paths)
        defaults = TaskManager() if include_path else full
        builtin = _cache_builtin_tasks(set(defaults.all_tasks) - (set() if include_path else set(own.all_tasks)))
    unknown = [t for t in missing if t not in builtin]
    if unknown:
        known = sorted(builtin | set(own.all_tasks))
        raise KeyError(f"unknown lm-eval tasks {unknown}{_suggestions(unknown, known)}; `lm-eval ls tasks` lists "
                       "lm-eval's (and ours, the offline MMLU: evalsuite_mmlu, evalsuite_mmlu_continuation and "
                       "their subjects)")
    return full or TaskManager(include_path=paths)


def _suggestions(unknown: list[str], known: list[str]) -> str:
    import difflib

    close = {t: difflib.get_close_matches(t, known, n=3, cutoff=0.75) for t in unknown}
    said = [f"{t!r}: did you mean {', '.join(map(repr, c))}?" for t, c in close.items() if c]
    return f" ({'; '.join(said)})" if said else ""


def _builtin_tasks_file() -> Path:
    """One file per lm-eval install: its version and location (the built-in tasks ship with it)."""
    import lm_eval

    from ..assets import cache_dir

    key = hashlib.sha256(f"{lm_eval.__version__}:{Path(lm_eval.__file__).resolve().parent}".encode()).hexdigest()
    return cache_dir() / "lm_eval" / f"builtin-tasks-{key[:16]}.json"


def _cached_builtin_tasks() -> frozenset[str] | None:
    try:
        return frozenset(json.loads(_builtin_tasks_file().read_text()))
    except (OSError, ValueError):
        return None


def _cache_builtin_tasks(names: set[str]) -> frozenset[str]:
    path = _builtin_tasks_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(sorted(names)))
    tmp.replace(path)
    return frozenset(names)


@dataclass(frozen=True)
class ChatFormat:
    """How lm-eval renders prompts: plain (the default), or through the model's chat template
    (its --apply_chat_template), optionally with few-shot examples as earlier turns and a system
    message. Part of a run's identity: the same task scores differently in each."""

    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None

    def identity(self) -> dict[str, Any]:
        return {} if self == ChatFormat() else {"chat": asdict(self)}


TASK_FILE_SUFFIXES = (".yaml", ".yml", ".py", ".jinja", ".txt")


def task_files_hash(include_path: str | None = None) -> str:
    """What defines the tasks besides their names: lm-eval's version (its built-in task files ship
    with it) and the task files (YAML, Python, templates) of ours and of the include path. It is
    part of a run's identity, so an edited task file makes a new run instead of resuming the
    records of the old one. (Data files are checked record by record: ``_check_unchanged``.)"""
    import lm_eval

    from ..taskdef import TASKS_DIR

    h = hashlib.sha256(f"lm_eval {lm_eval.__version__}".encode())
    for root in [TASKS_DIR / "lm_eval"] + ([Path(include_path)] if include_path else []):
        for f in sorted(root.rglob("*")):
            if f.suffix in TASK_FILE_SUFFIXES and f.is_file():
                h.update(f"\0{f.relative_to(root)}\0".encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def _check_unchanged(store: RunStore, records: list[dict[str, Any]]) -> None:
    """A rerun's records of documents already recorded must be the same documents and prompts
    (lm-eval's hashes): otherwise the task's data changed under the run folder."""
    previous = store.latest()
    changed = [r["id"] for r in records if r["id"] in previous and any(
        previous[r["id"]].get(k) != r.get(k) for k in ("doc_hash", "prompt_hash", "target_hash"))]
    if changed:
        raise RunConflictError(
            f"{store.dir}: {len(changed)} documents differ from the ones recorded there (first: {changed[0]}): "
            "the task's data changed since; choose another --output or delete the folder")


def run_lm_eval(backend: Backend, tasks: list[str], out_dir: str | Path, *, limit: float | None = None,
                num_fewshot: int | None = None, include_path: str | None = None, seed: int = 1234,
                manager=None, chat: ChatFormat = ChatFormat(), gen_kwargs: dict[str, Any] | None = None) -> RunResult:
    """``manager``: from ``task_manager`` (built here when not given)."""
    import lm_eval

    from .lm_eval_model import EvalsuiteLM

    out = Path(out_dir)
    manager = manager or task_manager(tasks, include_path)
    identity = {"task": "lm-eval", "config": {"tasks": sorted(tasks), "limit": limit, "num_fewshot": num_fewshot,
                                              "seed": seed, "task_files": task_files_hash(include_path),
                                              **chat.identity(), **({"gen_kwargs": gen_kwargs} if gen_kwargs else {})},
                **backend_identity(backend)}
    config_hash = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    store = RunStore(out, identity, config_hash, key=lambda r: r["id"])
    store.run["backend"] = backend.describe()
    store.run["versions"] = package_versions()
    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=EvalsuiteLM(backend=backend), tasks=tasks, limit=limit, num_fewshot=num_fewshot, log_samples=True,
        task_manager=manager, use_cache=str(out / "lm_eval_cache"), random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed, apply_chat_template=chat.apply_chat_template,
        fewshot_as_multiturn=chat.fewshot_as_multiturn, system_instruction=chat.system_instruction,
        gen_kwargs=gen_kwargs)
    records = []
    for task, samples in results["samples"].items():
        for s in samples:  # one per document and filter (a task with several filters logs each)
            rid = f"{task}/{s['doc_id']}" + ("" if s.get("filter", "none") == "none" else f"/{s['filter']}")
            records.append({"id": rid, "task": task, **json.loads(json.dumps(s, default=str))})
    _check_unchanged(store, records)
    done = store.done_keys()
    store.append(r for r in records if r["id"] not in done)
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
