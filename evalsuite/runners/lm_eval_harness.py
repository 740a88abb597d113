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
    MMLU) and those in ``include_path`` (which override built-in names, as in lm-eval). A KeyError
    names the unknown ones, with the names closest to each. Called before a model loads. Parsing
    lm-eval's ~14,000 built-in task files takes 12-15 s, so their index is built once per state of
    those files and kept, with its names apart (``_builtin_index``); the tasks of ours and of the
    include path are indexed on every call, and alone when they hold every task asked for."""
    from lm_eval.tasks import TaskManager

    from ..taskdef import TASKS_DIR

    paths = [str(TASKS_DIR / "lm_eval")] + ([include_path] if include_path else [])
    own = TaskManager(include_path=paths, include_defaults=False)
    missing = [t for t in tasks if t not in own.all_tasks]
    if not missing:
        return own
    path = _builtin_index_path()
    builtin = None
    names = _builtin_names(path)  # a misspelt name is refused without reading the whole index
    if names is None:
        builtin = _builtin_index(path)
        names = frozenset(builtin)
    unknown = [t for t in missing if t not in names]
    if unknown:
        known = sorted(names | set(own.all_tasks))
        raise KeyError(f"unknown lm-eval tasks {unknown}{_suggestions(unknown, known)}; `lm-eval ls tasks` lists "
                       "lm-eval's (and ours, the offline MMLU: evalsuite_mmlu, evalsuite_mmlu_continuation and "
                       "their subjects)")
    return _with_builtins(own, builtin if builtin is not None else _builtin_index(path))


def _suggestions(unknown: list[str], known: list[str]) -> str:
    import difflib

    close = {t: difflib.get_close_matches(t, known, n=3, cutoff=0.75) for t in unknown}
    said = [f"{t!r}: did you mean {', '.join(map(repr, c))}?" for t, c in close.items() if c]
    return f" ({'; '.join(said)})" if said else ""


def _builtin_index_path() -> Path:
    """Where lm-eval's index of its built-in tasks is kept: under a key of lm-eval's version and
    location and every task file's path, size and modification time, so that an edited or added
    file (an editable install) builds it anew."""
    import lm_eval

    from ..assets import cache_dir

    root = Path(lm_eval.__file__).resolve().parent / "tasks"
    key = hashlib.sha256(f"{lm_eval.__version__}:{root}".encode())
    for f in sorted(root.glob("**/*.yaml")):
        st = f.stat()
        key.update(f"\0{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return cache_dir() / "lm_eval" / f"builtin-index-{key.hexdigest()[:16]}.pickle"


def _builtin_names(path: Path) -> frozenset[str] | None:
    """The built-in task names kept beside the index (None: not built yet)."""
    try:
        return frozenset(json.loads(path.with_suffix(".names.json").read_text()))
    except (OSError, ValueError):
        return None


def _builtin_index(path: Path) -> dict[str, Any]:
    """lm-eval's index of its built-in tasks (``TaskIndex.build`` over lm_eval/tasks: name ->
    entry with its parsed YAML), read from ``path`` or built and kept there, with its names."""
    import pickle

    import lm_eval
    from lm_eval.tasks._index import TaskIndex

    if path.is_file():
        try:
            return pickle.loads(path.read_bytes())
        except Exception:  # a truncated or foreign file: build the index again and replace it
            pass
    index = TaskIndex.build([Path(lm_eval.__file__).resolve().parent / "tasks"])
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, data in ((path, pickle.dumps(index)),
                         (path.with_suffix(".names.json"), json.dumps(sorted(index)).encode())):
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    return index


def _with_builtins(own, builtin: dict[str, Any]):
    """``own`` (a TaskManager of our paths) holding the built-in tasks too, exactly as
    ``TaskManager(include_path=paths)`` would build it: the built-in entries first, ours over
    them. Sets what lm-eval's constructor derives from its index (tests/test_lm_eval.py compares
    the two managers); an lm-eval whose manager keeps them elsewhere gets the full build."""
    from collections import defaultdict

    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    names = ("_index", "_all_tasks", "_all_subtasks", "_all_groups", "_all_tags")
    if not all(hasattr(own, n) for n in names):
        return TaskManager(include_path=own.include_path)
    own._index = {**builtin, **own._index}
    buckets = defaultdict(list)
    for name, entry in own._index.items():
        buckets[entry.kind].append(name)
    own._all_tasks = sorted(own._index)
    own._all_subtasks = sorted(buckets[Kind.TASK] + buckets[Kind.PY_TASK])
    own._all_groups = sorted(buckets[Kind.GROUP])
    own._all_tags = sorted(buckets[Kind.TAG])
    return own


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
    if not getattr(manager.load, "preloaded", False):
        _name_loading_errors(manager, tasks)
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


class TaskLoadError(ValueError):
    """lm-eval could not build a task: its data could not be fetched or read, or its config is bad."""


def _name_loading_errors(manager, tasks: list[str]) -> None:
    """A task whose data cannot be loaded (the hub unreachable, a missing file) fails inside
    lm-eval with whatever the datasets library raises; this makes it one TaskLoadError naming
    the tasks and the cause, printed as an error rather than a traceback."""
    load = manager.load

    def named(*args, **kwargs):
        try:
            return load(*args, **kwargs)
        except Exception as e:  # the datasets library and lm-eval's task code raise many types
            text = f"{type(e).__name__}: {e}"
            hint = ""
            if isinstance(e, ConnectionError) or "Offline" in text or "Couldn't reach" in text:
                hint = ("; lm-eval's built-in tasks download their data from the Hugging Face hub: with no network, "
                        "put it in the datasets cache beforehand (HF_DATASETS_OFFLINE=1 then reads it from there), "
                        "or run a task whose data is local (ours, or --include-path)")
            raise TaskLoadError(f"lm-eval could not load the tasks {tasks}: {text}{hint}") from e

    manager.load = named


def load_tasks(manager, tasks: list[str], seed: int) -> None:
    """Build lm-eval's task objects (their data read, or downloaded) before a model loads, so that
    a task whose data cannot be had fails in seconds rather than after the model has loaded;
    ``simple_evaluate`` then takes these objects from ``manager`` instead of building them again.
    The global generators are seeded as ``simple_evaluate`` seeds them before it builds tasks, and
    their states after building are given back when it asks, so any randomness a task's
    construction draws leaves everything after it as it would have been."""
    import random

    import numpy as np
    import torch

    _name_loading_errors(manager, tasks)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    loaded = manager.load(list(tasks))
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    build = manager.load
    pending = [loaded]

    def load(task_list, *args, **kwargs):
        if pending and list(task_list) == list(tasks):
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
            return pending.pop()
        return build(task_list, *args, **kwargs)

    load.preloaded = True  # errors are named already
    manager.load = load


def format_lm_eval_summary(metrics: dict[str, Any]) -> str:
    lines = []
    for task, m in metrics.items():  # the tasks asked for first (run_lm_eval)
        values = ", ".join(f"{k.removesuffix(',none')} {v:.4f}" for k, v in m.items()
                           if isinstance(v, float) and not k.split(",")[0].endswith("_stderr"))
        lines.append(f"{task}: {values}")
    return "\n".join(lines)
