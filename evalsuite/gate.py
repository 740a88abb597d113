"""`evalsuite gate GATE.yaml`: produce (or reuse) the runs a gate file names, compare every
candidate with the baseline at the gate's tolerances, and exit with the verdict.

Exit codes: 0 PASS (every metric of every candidate), 1 FAIL (some metric's interval lies wholly
below -tolerance), 2 INCONCLUSIVE (none failed, some undecided at this sample size), 3 error (a
bad gate file, a run that could not be produced, a metric missing on one side).

A gate file::

    name: quick
    model: smollm2-135m
    tasks:                          # runs produced here: `evalsuite run TASK ARGS...`
      mmlu: [--formulation, cloze, --per-subject, "2"]
      perplexity: [--per-article, "1"]
      lm-eval: [--task, evalsuite_mmlu_stem]   # `evalsuite run --harness lm-eval ARGS...`
    runs_dir: reports/gates/quick   # where produced runs live (resumed when rerun)
    baseline: {recipe: fp8-official}
    candidates:
      - {recipe: fp8-modelopt}
      - {recipe: int4-awq, recipe_config: {calibration: {num_samples: 8}}}
      - {run: reports/runs/some-run}   # an existing run folder
    metrics:                        # metric (or family prefix) -> tolerance
      mmlu.cloze.acc: {absolute: 0.05, max_flip_rate: 0.3}
      perplexity: {relative: 0.05}
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import yaml

from .compare import PASS, CandidateResult, Side, Tolerance, compare_sides, side_from_run
from .records import unfinished_run

EXIT_ERROR = 3
SIDE_KEYS = {"recipe", "recipe_config", "run", "ref", "label"}


class GateError(ValueError):
    pass


@dataclass
class Gate:
    name: str
    path: Path
    tasks: dict[str, list[str]]  # task name -> its `evalsuite run` arguments
    model: str
    runs_dir: Path
    baseline: dict[str, Any]
    candidates: list[dict[str, Any]]
    metrics: dict[str, Tolerance]
    dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict)


def load_gate(path: str | Path) -> Gate:
    path = Path(path)
    if not path.is_file():
        raise GateError(f"gate file {path} does not exist")
    raw = yaml.safe_load(path.read_text())
    where = str(path)
    if not isinstance(raw, dict):
        raise GateError(f"{where}: a gate file is a mapping")
    known = {"name", "description", "task", "model", "args", "tasks", "runs_dir", "baseline", "candidates",
             "metrics", "dtype"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise GateError(f"{where}: unknown keys {unknown}; valid keys: {sorted(known)}")
    for key in ("baseline", "candidates", "metrics"):
        if key not in raw:
            raise GateError(f"{where}: missing key {key!r}")
    if not isinstance(raw["candidates"], list) or not raw["candidates"]:
        raise GateError(f"{where}: candidates must be a non-empty list")
    sides = [raw["baseline"], *raw["candidates"]]
    for i, side in enumerate(sides):
        label = "baseline" if i == 0 else f"candidates[{i - 1}]"
        if not isinstance(side, dict) or not (set(side) & {"recipe", "run", "ref"}) or set(side) - SIDE_KEYS:
            raise GateError(f"{where}: {label} = {side!r}; give one of recipe (with optional recipe_config), "
                            f"run (a run folder) or ref (ref:<file>:<recipe>); valid keys: {sorted(SIDE_KEYS)}")
        if not isinstance(side.get("recipe_config", {}), dict):
            raise GateError(f"{where}: {label}.recipe_config = {side['recipe_config']!r}; valid: a mapping of the "
                            "recipe's settings, e.g. {kernel: 'off'}")
        if "recipe" in side and not (raw.get("task") or raw.get("tasks")):
            raise GateError(f"{where}: {label} names a recipe to run, so the gate needs a task (or tasks)")
    if raw.get("task") and raw.get("tasks"):
        raise GateError(f"{where}: give either task (with args) or tasks (task name -> args), not both")
    tasks = raw.get("tasks") or ({raw["task"]: raw.get("args", [])} if raw.get("task") else {})
    if not isinstance(tasks, dict) or not all(isinstance(a, list) for a in tasks.values()):
        raise GateError(f"{where}: tasks maps task names to argument lists, e.g. {{mmlu: [--per-subject, '2']}}")
    if not isinstance(raw["metrics"], dict) or not raw["metrics"]:
        raise GateError(f"{where}: metrics must map metric names to tolerances, e.g. mmlu.cloze.acc: {{absolute: 0.05}}")
    try:
        metrics = {k: Tolerance.parse(v, f"{where}: metrics.{k}") for k, v in raw["metrics"].items()}
    except ValueError as e:
        raise GateError(str(e)) from None
    name = raw.get("name") or path.stem
    return Gate(name=name, path=path, tasks={t: [str(a) for a in args] for t, args in tasks.items()},
                model=raw.get("model", "smollm2-135m"), runs_dir=Path(raw.get("runs_dir", f"reports/gates/{name}")),
                baseline=raw["baseline"], candidates=raw["candidates"], metrics=metrics,
                dtype=raw.get("dtype", "bfloat16"))


def _run_folder_name(side: dict[str, Any]) -> str:
    cfg = side.get("recipe_config") or {}
    suffix = "".join(f"-{k}={json.dumps(v, sort_keys=True, separators=(',', ':'))}" for k, v in sorted(cfg.items()))
    return "".join(c if c.isalnum() or c in "-._=" else "_" for c in side["recipe"] + suffix)


def run_argv(gate: Gate, side: dict[str, Any], task: str, run_dir: Path, device: str | None = None) -> list[str]:
    """The ``evalsuite`` command line that produces (or resumes) ``side``'s run of ``task``: the
    task's args from the gate file, then ``device`` where given, so that it wins over theirs."""
    head = ["run", "--harness", "lm-eval"] if task == "lm-eval" else ["run", task]
    argv = [*head, "--model", gate.model, "--recipe", side["recipe"], "--dtype", gate.dtype,
            *gate.tasks[task], *(["--device", device] if device else []), "--output", str(run_dir), "--no-progress"]
    for k, v in (side.get("recipe_config") or {}).items():
        argv += ["--recipe-config", f"{k}={json.dumps(v)}"]
    return argv


def produce_side(gate: Gate, side: dict[str, Any], log, device: str | None = None) -> Side:
    """The side a gate entry names, running it first when it is a recipe (resumed if present), on
    ``device`` when given (after the task's args, so it wins over a --device there)."""
    if "run" in side:
        out = side_from_run(side["run"])
    elif "ref" in side:
        from .references import reference_sides

        (out,) = reference_sides(side["ref"])
    else:
        from .cli import main as cli_main
        from .compare import merge_sides

        parts = []
        for task in gate.tasks:
            run_dir = gate.runs_dir / f"{_run_folder_name(side)}-{task}"
            argv = run_argv(gate, side, task, run_dir, device)
            log(f"gate {gate.name}: evalsuite {' '.join(argv)}")
            t0 = time.perf_counter()
            rc = cli_main(argv)
            if rc != 0:
                raise GateError(unfinished_run(f"the {task} run for {side}", rc, run_dir))
            log(f"gate {gate.name}: {side['recipe']} {task} done in {time.perf_counter() - t0:.0f} s")
            parts.append(side_from_run(run_dir))
        (out,) = merge_sides(parts)
    if side.get("label"):
        out.label = side["label"]
    return out


def check_sides(gate: Gate, device: str | None = None) -> None:
    """Every side the gate runs checked against its model before the first run starts (recipe,
    settings, dtype, device's spelling): a misspelt setting of the last candidate must not wait
    for the baseline's runs to be refused."""
    from .models import check_model_args

    if any(a.split("=")[0] == "--base-url" for args in gate.tasks.values() for a in args):
        return  # the model is an endpoint's: each run checks what it may
    for i, side in enumerate([gate.baseline, *gate.candidates]):
        if "recipe" in side:
            where = "baseline" if i == 0 else f"candidates[{i - 1}]"
            try:
                check_model_args(gate.model, side["recipe"], side.get("recipe_config") or None, gate.dtype, device,
                                 needs_tokenizer=True)
            except (ValueError, KeyError) as e:
                raise GateError(f"{gate.path}: {where}: {e.args[0] if isinstance(e, KeyError) and e.args else e}") \
                    from None


def evaluate(gate: Gate, log=print, device: str | None = None) -> tuple[Side, list[CandidateResult]]:
    check_sides(gate, device)
    baseline = produce_side(gate, gate.baseline, log, device)
    candidates = [produce_side(gate, c, log, device) for c in gate.candidates]
    results = compare_sides(baseline, candidates, gate.metrics)
    for res in results:
        unmatched = sorted(g for g in gate.metrics if not _matching({g: gate.metrics[g]}, res.candidate.metrics)
                           and not _matching({g: gate.metrics[g]}, baseline.metrics))
        if unmatched:  # a misspelt metric would otherwise gate nothing and pass
            raise GateError(f"{gate.path}: gated metrics {unmatched} name no metric of the runs; they hold "
                            f"{sorted(set(baseline.metrics) | set(res.candidate.metrics))} (a name or a prefix "
                            "such as mmlu.cloze)")
        missing = sorted(_matching(gate.metrics, res.candidate.metrics) ^ _matching(gate.metrics, baseline.metrics))
        if missing or not res.comparisons:
            raise GateError(f"candidate {res.candidate.label}: gated metrics {missing or sorted(gate.metrics)} are "
                            f"not on both sides (baseline has {sorted(baseline.metrics)}, candidate has "
                            f"{sorted(res.candidate.metrics)})")
    return baseline, results


def _matching(gated: dict[str, Tolerance], metrics: dict[str, Any]) -> set[str]:
    return {m for m in metrics if any(m == g or m.startswith(g + ".") for g in gated)}


def junit_xml(gate: Gate, results: list[CandidateResult], seconds: float = 0.0) -> str:
    """JUnit XML: one test case per (candidate, metric); FAIL and INCONCLUSIVE are failures with
    their verdict as the type, so CI systems show them red with the reason."""
    cases = [(r.candidate.label, c) for r in results for c in r.comparisons]
    failures = sum(1 for _, c in cases if c.verdict != PASS)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuite name={quoteattr("evalsuite gate " + gate.name)} tests="{len(cases)}" '
             f'failures="{failures}" errors="0" skipped="0" time="{seconds:.1f}">']
    for label, c in cases:
        name = quoteattr(f"{c.metric} (tolerance {c.tolerance})")
        lines.append(f'  <testcase classname={quoteattr(label)} name={name}>')
        detail = (f"baseline {c.baseline:.4f}, candidate {c.candidate:.4f}, gain {c.gain:+.4f}; {c.reason} "
                  f"({c.method})")
        if c.verdict != PASS:
            lines.append(f'    <failure type="{c.verdict}" message={quoteattr(detail)}/>')
        else:
            lines.append(f"    <system-out>{_xml_text(detail)}</system-out>")
        lines.append("  </testcase>")
    lines.append("</testsuite>")
    return "\n".join(lines) + "\n"


def _xml_text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
