"""The ``evalsuite`` command: parse arguments, call the library, print."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path

from .taskdef import available_tasks

DEFAULT_REPORTS = Path("reports") / "runs"


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="registered name, HF folder, .gguf file or hub id")
    parser.add_argument("--recipe", default="bf16", help="quantization recipe (see `evalsuite recipes`)")
    parser.add_argument("--recipe-config", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override recipe settings, values as JSON (e.g. kv_scale_mode=deploy)")
    parser.add_argument("--dtype", default="bfloat16", help="engine dtype: bfloat16 (default) or float32")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


def _run_options() -> argparse.ArgumentParser:
    """The options every task takes; each runner adds its own (``evalsuite run TASK --help``)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    _model_options(g)
    g.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help="variables for the model's chat template on every chat prompt, e.g. "
                        "'{\"enable_thinking\": false}' (sent to an endpoint as vLLM and SGLang take them)")
    g = p.add_argument_group("endpoint (evaluate a model served elsewhere; --model is then its served id)")
    g.add_argument("--base-url", default=None,
                   help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM, TensorRT-LLM, "
                        "SGLang, evalsuite serve); no model is loaded here")
    g.add_argument("--tokenizer", default=None,
                   help="the served model's tokenizer for log-likelihood tasks (a model name, HF folder or "
                        ".gguf); default: --model when it names one here")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the endpoint's API key (default OPENAI_API_KEY)")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    g.add_argument("--prompts-per-request", type=int, default=8,
                   help="log-likelihood prompts sent in one completions request (default 8)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    g.add_argument("--max-retries", type=int, default=5, help="retries on 429/5xx/timeouts (default 5)")
    g = p.add_argument_group("execution (speed only: changing these resumes the same run)")
    g.add_argument("--batch-size", type=int, default=32,
                   help="sequences per forward (default 32; on a GPU with memory to spare, 64 with "
                        "--max-batch-tokens 16384 is what bench/gpu_check.py measures)")
    g.add_argument("--max-batch-tokens", type=int, default=4096,
                   help="packed prompt tokens per forward (default 4096)")
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt whole, reusing no K/V of earlier sequences (docs/PERF.md)")
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, help="run directory (default: reports/runs/<derived name>)")
    return p


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evalsuite", description="Accuracy evaluation of (quantized) LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a task on a model (resumes an interrupted run)", add_help=False,
                         usage="evalsuite run TASK [options]  (evalsuite run TASK --help lists them)")
    run.add_argument("task", nargs="?", help="task name (see `evalsuite tasks`)")
    run.add_argument("task_args", nargs=argparse.REMAINDER)

    le = sub.add_parser("lm-eval", help="lm-eval's own command line with the engine registered as --model evalsuite",
                        add_help=False)
    le.add_argument("lm_eval_args", nargs=argparse.REMAINDER)

    sv = sub.add_parser("serve", help="serve a model and recipe over an OpenAI-compatible HTTP API")
    _model_options(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--served-model-name", default=None, help="the id clients ask for (default: the model's name)")
    sv.add_argument("--api-key", default=None,
                    help="require this key on every request (default: $EVALSUITE_API_KEY if set, else none)")
    sv.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together (default 32)")
    sv.add_argument("--max-model-len", type=int, default=2048,
                    help="prompt + new tokens per sequence (default 2048; at most the model's context)")
    sv.add_argument("--max-prefill-tokens", type=int, default=2048,
                    help="prompt tokens prefilled per scheduler turn, between decode steps (default 2048)")
    sv.add_argument("--no-prefix-cache", action="store_true",
                    help="prefill every prompt whole, reusing no K/V of earlier requests")

    qz = sub.add_parser("quantize", help="apply a recipe and save the quantized checkpoint")
    _model_options(qz)
    qz.add_argument("--output", required=True, help="folder for config.json, model.safetensors, quantization.json")
    qz.add_argument("--format", choices=["evalsuite", "hf"], default="evalsuite",
                    help="evalsuite: the engine's checkpoint (any recipe, loads back as saved); hf: the form the "
                         "recipe's published checkpoints take, for vLLM, SGLang, TensorRT-LLM and transformers "
                         "(fp8-block, fp8-dynamic, fp8-modelopt, fp8-official, int4-awq, int4-awq-asym, int4-gptq, "
                         "int8-w8a8, nvfp4)")

    from .plan import GPUS, PLAN_GPUS, PLAN_RECIPES

    pl = sub.add_parser("plan", help="fewest GPUs that hold a model's weights and KV cache under a recipe")
    pl.add_argument("--model-config", default="llama-3.1-405b",
                    help="architecture preset (see `evalsuite models`), HF model folder or config.json "
                         "(default llama-3.1-405b)")
    pl.add_argument("--recipe", nargs="+", action="extend", default=None,
                    help=f"one or more (default: {' '.join(PLAN_RECIPES)})")
    pl.add_argument("--gpu", nargs="+", action="extend", default=None,
                    help=f"one or more of: {', '.join(GPUS)} (default: {' '.join(PLAN_GPUS)})")
    pl.add_argument("--context", type=int, default=8192, help="tokens per sequence (default 8192)")
    pl.add_argument("--batch", type=int, default=1, help="sequences held at once (default 1)")
    pl.add_argument("--usable-fraction", type=float, default=0.9, help="share of GPU memory for weights + KV")

    cp = sub.add_parser("compare", help="paired comparison and verdict of candidates against a baseline")
    cp.add_argument("sides", nargs="+", metavar="SIDE",
                    help="run folders, run ids from the index (#12 or 12), or references (ref:<file>[:<recipe>]); "
                         "the baseline is --baseline, else the fp8-official side when there is one, else the first")
    cp.add_argument("--baseline", default=None, help="the baseline: a SIDE, or the recipe of one of the sides")
    cp.add_argument("--tolerance", nargs="+", action="extend", default=[], metavar="METRIC=TOL",
                    help="per metric or family, e.g. mmlu=0.01 mt_bench=0.1 perplexity=5%% (a %% is relative); "
                         "default: the reference's own tolerances, else 0.01 (2%% for perplexity)")
    cp.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON ('-' for stdout)")

    gt = sub.add_parser("gate", help="run a gate file: produce its runs, compare, exit 0 PASS, 1 FAIL, "
                                     "2 INCONCLUSIVE, 3 error")
    gt.add_argument("gate", help="a gate YAML (see tasks/gates/)")
    gt.add_argument("--junit", default=None, metavar="FILE", help="also write JUnit XML for CI systems")
    gt.add_argument("--json", default=None, metavar="FILE", help="also write the comparison as JSON")
    gt.add_argument("--device", default=None, help="cpu, cuda or cuda:N for the runs the gate produces, over "
                                                    "a --device in its tasks' args (default: theirs, else cuda "
                                                    "when available, else cpu); not part of any run's folder")

    bn = sub.add_parser("bench", help="output tokens/s per recipe: batch 1 and maximum throughput, TTFT and ITL")
    bn.add_argument("--model", default="smollm2-135m")
    bn.add_argument("--dtype", default="bfloat16")
    bn.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    bn.add_argument("--recipes", nargs="+", action="extend", default=None, help="default: every recipe")
    bn.add_argument("--lengths", nargs="+", action="extend", default=None, metavar="ISL/OSL",
                    help="input/output lengths (default 128/32 512/32)")
    bn.add_argument("--note-lengths", action="store_true", help="the note's grid: 2048/128 32768/2048 120000/2048")
    bn.add_argument("--batches", nargs="+", action="extend", type=int, default=None,
                    help="batch sizes swept for maximum throughput; 1 is always included (default 1 8 32)")
    bn.add_argument("--base-url", default=None, help="benchmark an OpenAI-compatible endpoint instead")
    bn.add_argument("--served-model", default=None, help="the endpoint's model id (default: --model)")
    bn.add_argument("--api-key-env", default="OPENAI_API_KEY",
                    help="environment variable holding the endpoint's API key (default OPENAI_API_KEY)")
    bn.add_argument("--timeout", type=float, default=600.0, help="seconds per endpoint request (default 600)")
    bn.add_argument("--baseline", default="fp8-official", help="the recipe speedups are computed against")
    bn.add_argument("--output", default=None, help="folder for bench.json (default reports/bench/<model>-<time>)")

    rp = sub.add_parser("report", help="reports/NAME/: Markdown + HTML, accuracy-vs-throughput and per-subject "
                                       "plots, CSV tables")
    rp.add_argument("name", help="the report's folder name under --root")
    rp.add_argument("sides", nargs="+", metavar="SIDE", help="run folders or run ids (as for compare)")
    rp.add_argument("--baseline", default=None, help="as for compare (default: the fp8-official run)")
    rp.add_argument("--bench", default=None, help="a folder written by `evalsuite bench` (throughput axis)")
    rp.add_argument("--reference", nargs="*", default=["ref:llama-3.1-405b-h200"],
                    help="published references for their own panel (default: the Llama 3.1 405B note)")
    rp.add_argument("--tolerance", nargs="+", action="extend", default=[], metavar="METRIC=TOL", help="as for compare")
    rp.add_argument("--root", default="reports", help="where report folders go (default reports/)")

    st = sub.add_parser("study", help="the whole study in one resumable command: every recipe on MMLU and "
                                      "perplexity, the throughput benchmark, the comparison and the report")
    st.add_argument("--name", default="study", help="folder under --root (default: study)")
    st.add_argument("--model", default="smollm2-135m")
    st.add_argument("--recipes", nargs="+", action="extend", default=None, help="default: every recipe")
    st.add_argument("--baseline", default=None, metavar="RECIPE",
                    help="the recipe the others are compared with, one of --recipes (default: fp8-official, "
                         "as in the reference case; bf16 asks whether a recipe holds unquantized accuracy)")
    st.add_argument("--full", action="store_true",
                    help="full size: every MMLU question and paragraph, the note's lengths (hours on a CPU)")
    st.add_argument("--per-subject", type=int, default=None, help="MMLU questions per subject (quick default 2)")
    st.add_argument("--per-article", type=int, default=None, help="perplexity paragraphs per article (quick default 2)")
    st.add_argument("--formulation", nargs="+", action="extend", default=None,
                    help="MMLU formulations (quick default: cloze; full: letter cloze)")
    st.add_argument("--mt-bench", type=int, default=None, metavar="N", dest="mt_bench",
                    help="add MT-Bench on N questions (judged by the embedded judge; --full: all 80)")
    st.add_argument("--mt-bench-tokens", type=int, default=None, metavar="T",
                    help="new tokens per MT-Bench answer (default FastChat's 1024)")
    st.add_argument("--device", default=None, help="cpu, cuda or cuda:N for every run and the benchmark "
                                                    "(default: cuda when available, else cpu)")
    st.add_argument("--rebench", action="store_true", help="redo the throughput benchmark even if it exists")
    st.add_argument("--root", default="reports", help="where the study folder goes (default reports/)")

    rn = sub.add_parser("runs", help="list runs in the run index")
    rn.add_argument("--task", default=None)
    rn.add_argument("--model", default=None)
    rn.add_argument("--recipe", default=None)
    rn.add_argument("--since", default=None, help="finished on or after this date (YYYY-MM-DD)")
    rn.add_argument("--prune", action="store_true",
                    help="remove the listed runs whose folders are gone (deleted or moved) from the index")
    rn.add_argument("--index", default=None, help="the index file (default: $EVALSUITE_INDEX or reports/index.sqlite)")

    sub.add_parser("models", help="list registered models")
    sub.add_parser("tasks", help="list tasks")
    sub.add_parser("recipes", help="list quantization recipes")
    return p


_RUN_USAGE = ("usage: evalsuite run TASK [options]; tasks: {tasks}\n`evalsuite run TASK --help` lists a task's "
              "options\nany lm-eval task: evalsuite run --harness lm-eval --task NAME [options] (--help lists them)")


def _run(args: argparse.Namespace) -> int:
    from .models import check_model_args, load_model_and_recipe
    from .runners import get_runner
    from .taskdef import read_task_file

    if args.task is None:
        print(_RUN_USAGE.format(tasks=", ".join(available_tasks())))
        return 2
    raw, _ = read_task_file(args.task)
    runner = get_runner(raw["runner"])
    task = runner.parse_task(raw, f"tasks/{args.task}.yaml")
    parser = argparse.ArgumentParser(prog=f"evalsuite run {args.task}", parents=[_run_options()])
    runner.add_arguments(parser.add_argument_group(f"{args.task}"))
    opts = parser.parse_args(args.task_args)
    # Everything that can be checked without a model is checked first.
    opts.chat_template_kwargs = _parse_template_kwargs(opts.chat_template_kwargs)
    job = runner.prepare(task, opts)
    _output_folder("--output", opts.output)
    if opts.base_url:
        backend = _endpoint_backend(opts)
        name = run_name(opts.model, "endpoint", args.task, job, {"backend": backend.identity()})
        label = f"endpoint {backend.describe()['base_url']}, model {opts.model}"
    else:
        overrides = parse_recipe_config(opts.recipe_config)
        check_model_args(opts.model, opts.recipe, overrides, opts.dtype, opts.device, needs_tokenizer=True)
        if opts.batch_size < 1 or opts.max_batch_tokens < 1:
            raise ValueError(f"--batch-size {opts.batch_size} and --max-batch-tokens {opts.max_batch_tokens}: "
                             "both must be >= 1")
        from .backends.engine import EngineBackend  # torch: imported once the arguments are checked

        lm, recipe = load_model_and_recipe(opts.model, opts.recipe, opts.dtype, overrides, opts.device)
        backend = EngineBackend(lm, recipe, max_batch_size=opts.batch_size, max_batch_tokens=opts.max_batch_tokens,
                                prefix_cache=not opts.no_prefix_cache, chat_template_kwargs=opts.chat_template_kwargs)
        name = run_name(lm.info.name, opts.recipe, args.task, job, {"dtype": opts.dtype, "recipe_config": overrides,
                                                                     **_template_identity(opts)})
        label = f"model {lm.info.name} ({lm.info.dtype}), recipe {opts.recipe}"
    out = Path(opts.output) if opts.output else DEFAULT_REPORTS / name
    print(f"{label}, writing {out}", file=sys.stderr)
    result = runner.run(job, backend, out, progress=not opts.no_progress)
    _index_run(out, result.run)
    print(runner.summary(result))
    print(f"\nrecords: {out / 'samples.jsonl'}\nrun record: {out / 'run.json'}")
    return 0 if result.run.get("status") == "complete" else 1


def _check_folder_name(flag: str, name: str) -> None:
    """A study's or report's name is one folder under --root, never a path out of it."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{flag} {name!r}: valid: a folder name (letters, digits, - _ .), created under --root")


def _index_run(run_dir: Path, run: dict) -> None:
    """Record a finished run in the run index; an index that cannot be written costs a warning,
    never the run."""
    import sqlite3

    from .runindex import RunIndex

    try:
        RunIndex().record(run_dir, run)
    except (OSError, sqlite3.Error) as e:
        print(f"evalsuite: warning: the run index was not updated: {e}", file=sys.stderr)


def _resolve_sides(specs: list[str]):
    from .compare import side_from_run
    from .references import reference_sides
    from .runindex import RunIndex

    sides = []
    for spec in specs:
        if spec.startswith("ref:"):
            sides.extend(reference_sides(spec))
        elif spec.lstrip("#").isdigit() and not Path(spec).exists():
            run_dir = RunIndex().get(int(spec.lstrip("#"))).run_dir
            if not (Path(run_dir) / "run.json").is_file():
                raise ValueError(f"run {spec} of the run index: its folder {run_dir} is gone (deleted or moved; "
                                 "`evalsuite runs --prune` drops such runs from the index)")
            sides.append(side_from_run(run_dir))
        else:
            if not Path(spec).is_dir():
                raise ValueError(f"{spec!r} is neither a run folder, a run id from `evalsuite runs`, nor ref:<name>; "
                                 "references: " + ", ".join(f"ref:{r}" for r in __import__(
                                     "evalsuite.references", fromlist=["available"]).available()))
            sides.append(side_from_run(spec))
    from .compare import merge_sides

    return merge_sides(sides)


def _pick_baseline(sides: list, baseline: str | None):
    """``--baseline`` (a side, or the recipe or label of one), else the fp8-official side when
    there is exactly one (the reference case's baseline), else the first."""
    if baseline:
        picked = [s for s in sides if baseline in (s.recipe, s.label, s.source)]
        if not picked:
            picked = _resolve_sides([baseline])
            sides = picked + sides
        base = picked[0]
    else:
        official = [s for s in sides if s.recipe == "fp8-official" and not s.source.startswith("ref:")] or \
            [s for s in sides if s.recipe == "fp8-official"]
        base = official[0] if len(official) >= 1 else sides[0]
    return base, [s for s in sides if s is not base]


def _tolerances(items: list[str], refs: set[str], metrics: set[str]):
    """Tolerances by metric name: the references' own, then ``--tolerance METRIC=TOL`` items, each
    naming a metric of the compared runs (``metrics``) or a prefix of one (``mmlu``, ``mmlu.cloze``)."""
    from .compare import Tolerance
    from .references import load_reference

    tolerances: dict[str, Tolerance] = {}
    for name in sorted(refs):
        tolerances.update(load_reference(name).tolerances())
    prefixes = {".".join(m.split(".")[:i]) for m in metrics for i in range(1, m.count(".") + 2)}
    given: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--tolerance takes METRIC=TOL (e.g. mmlu=0.01 or perplexity=5%), got {item!r}")
        if key in given:
            raise ValueError(f"--tolerance {key} is given twice ({given[key]} and {item}); valid: each metric once")
        given[key] = item
        try:
            tol = float(value.rstrip("%")) / 100 if value.endswith("%") else float(value)
        except ValueError:
            raise ValueError(f"--tolerance {item!r}: {value!r} is not a number (or a percentage)") from None
        if not tol >= 0:  # also refuses nan
            raise ValueError(f"--tolerance {item!r}: valid: a tolerance >= 0 (how far below the baseline is allowed)")
        if key not in prefixes:
            raise ValueError(f"--tolerance {item!r}: no compared metric is named {key!r}; valid: "
                             + ", ".join(sorted(prefixes)))
        tolerances[key] = Tolerance(tol, value.endswith("%"))
    tolerances.setdefault("perplexity", Tolerance(0.02, True))
    return tolerances


def _checked_sides(command: str, specs: list[str], baseline: str | None):
    """The baseline and candidates of ``compare`` and ``report``: at least two sides, and each
    candidate shares a metric with the baseline (else there is nothing to decide on)."""
    sides = _resolve_sides(specs)
    sources = [s.source for s in sides]
    twice = sorted({src for src in sources if sources.count(src) > 1})
    if twice:
        raise ValueError(f"{command}: {', '.join(twice)} given more than once; give each run once")
    if len(sides) < 2:
        raise ValueError(f"{command} needs a baseline and at least one candidate; the runs given form "
                         f"{len(sides)} side{'s' * (len(sides) != 1)} ({'; '.join(s.source for s in sides)}): runs "
                         "of one model and recipe on different tasks count as one side")
    base, candidates = _pick_baseline(sides, baseline)
    for cand in candidates:
        if not set(cand.metrics) & set(base.metrics):
            families = sorted({m.split(".")[0] for m in base.metrics})
            raise ValueError(f"{cand.label} ({cand.source}) has no metric in common with the baseline "
                             f"{base.label} ({base.source}: {', '.join(families)}); compare runs of the same task")
    return base, candidates


DEFAULT_TOLERANCE = 0.01


def _output_file(flag: str, path: str | None) -> None:
    """A file a command writes when it is done (``--json``, ``--junit``), checked before any work
    starts: not a folder; its folder is made if missing. A gate's verdict must not be lost to a
    path that fails after its runs."""
    if path is None or path == "-":
        return
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path!r} is a folder; valid: a file path (its folder is made if missing)")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path!r}: its folder cannot be made ({e.strerror})") from None


def _output_folder(flag: str, path: str | Path | None) -> None:
    """A folder a command writes into (made if missing), checked before any work starts: neither
    it nor a folder on the way to it may be a file."""
    if path is None:
        return
    p = Path(path)
    existing = next((a for a in (p, *p.parents) if a.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "" if existing == p else f" ({existing} is a file)"
        raise ValueError(f"{str(path)!r} ({flag}) is not a folder{where}; valid: a folder (made if missing)")


def _compare(args: argparse.Namespace) -> int:
    from .compare import EXIT_CODES, Tolerance, compare_sides, format_table, overall, results_json
    from .references import format_speedups, load_reference

    _output_file("--json", args.json)
    base, candidates = _checked_sides("compare", args.sides, args.baseline)
    refs = {spec.split(":")[1] for spec in args.sides if spec.startswith("ref:")}
    metrics = {m for side in (base, *candidates) for m in side.metrics}
    results = compare_sides(base, candidates, _tolerances(args.tolerance, refs, metrics), Tolerance(DEFAULT_TOLERANCE))
    print(format_table(base, results))
    for text in filter(None, (format_speedups(load_reference(r)) for r in sorted(refs))):
        print("\n" + text)
    if args.json:
        blob = json.dumps(results_json(base, results), indent=2, default=str)
        if args.json == "-":
            print(blob)
        else:
            Path(args.json).write_text(blob)
    return EXIT_CODES[overall([r.verdict for r in results])]


def _report(args: argparse.Namespace) -> int:
    _check_folder_name("report name", args.name)
    _output_folder(f"--root {args.root}, report {args.name}", Path(args.root) / args.name)
    base, candidates = _checked_sides("report", args.sides, args.baseline)
    tolerances = _tolerances(args.tolerance, set(), {m for side in (base, *candidates) for m in side.metrics})
    from .bench import BenchResult  # torch, matplotlib: imported once the sides are found
    from .compare import Tolerance
    from .references import format_speedups, load_reference, reference_sides
    from .report import build_report

    bench = BenchResult.read(args.bench) if args.bench else None
    refs = [reference_sides(r) for r in args.reference]
    ref_names = {r.split(":")[1] for r in args.reference}
    extra = "\n\n".join(f"{ref.raw['source'].strip()}\n{text}" for ref in map(load_reference, sorted(ref_names))
                          if (text := format_speedups(ref)))
    report = build_report(args.name, base, candidates, tolerances,
                          default=Tolerance(DEFAULT_TOLERANCE), bench=bench,
                          reference_sides=[s for group in refs for s in group], root=Path(args.root),
                          extra_text=extra)
    print(f"report {args.name}: {report.verdict}")
    for f in sorted(report.folder.iterdir()):
        print(f"  {f}")
    return 0


def _gate(args: argparse.Namespace) -> int:
    import time

    from .compare import EXIT_CODES as EXIT
    from .compare import format_table, overall, results_json
    from .engine.options import check_device
    from .gate import EXIT_ERROR, GateError, evaluate, junit_xml, load_gate
    from .models import check_device_here

    t0 = time.perf_counter()
    try:
        check_device(args.device)
        _output_file("--junit", args.junit)
        _output_file("--json", args.json)
        gate = load_gate(args.gate)
        _output_folder("the gate file's runs_dir", gate.runs_dir)
        check_device_here(args.device)  # before the first run starts
        base, results = evaluate(gate, log=lambda m: print(m, file=sys.stderr, flush=True), device=args.device)
    except (GateError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"evalsuite gate: error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return EXIT_ERROR
    verdict = overall([r.verdict for r in results])
    print(format_table(base, results))
    print(f"\ngate {gate.name}: {verdict} (exit {EXIT[verdict]})")
    if args.junit:
        Path(args.junit).write_text(junit_xml(gate, results, time.perf_counter() - t0))
    if args.json:
        Path(args.json).write_text(json.dumps(results_json(base, results, {"gate": gate.name}), indent=2, default=str))
    return EXIT[verdict]


def _bench(args: argparse.Namespace) -> int:
    import time

    from .models import check_model_args
    from .quant.api import all_recipes

    lengths = []
    for item in args.lengths or []:
        isl, sep, osl = item.partition("/")
        if not (sep and isl.isdigit() and osl.isdigit() and int(isl) > 0 and int(osl) > 0):
            raise ValueError(f"--lengths {item!r}: give ISL/OSL as positive integers, e.g. 128/32")
        lengths.append((int(isl), int(osl)))
    if args.batches and min(args.batches) < 1:
        raise ValueError(f"--batches {args.batches}: batch sizes must be >= 1")
    _output_folder("--output", args.output)
    recipes = args.recipes or list(all_recipes())
    if args.base_url:
        from .backends.openai import check_base_url

        check_base_url(args.base_url)
        if args.recipes:
            raise ValueError(f"--recipes {' '.join(args.recipes)} with --base-url; valid: no --recipes, since an "
                             "endpoint is timed as it serves (its rows take the recipe its runs are labelled with)")
    else:
        for r in recipes:
            check_model_args(args.model, r, None, args.dtype, args.device)
    from .bench import (
        DEFAULT_BATCHES,
        DEFAULT_LENGTHS,
        NOTE_LENGTHS,
        BenchResult,
        endpoint_row,
        format_tables,
        run_bench,
    )

    lengths = lengths or list(NOTE_LENGTHS if args.note_lengths else DEFAULT_LENGTHS)
    batches = sorted({1, *(args.batches or DEFAULT_BATCHES)})
    out = Path(args.output) if args.output else Path("reports") / "bench" / \
        f"{Path(args.model).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.base_url:
        import os

        from .backends.base import BackendError
        from .backends.openai import OpenAIBackend, redact_url

        served = args.served_model or args.model
        # reachable, the key accepted and the model served, before any timing (a clean error if not)
        endpoint = OpenAIBackend(args.base_url, served, api_key_env=args.api_key_env, timeout=args.timeout,
                                 max_retries=1)
        label = endpoint.identity()["recipe"]["name"]  # as a run through this endpoint is labelled
        key = os.environ.get(args.api_key_env) or "EMPTY"
        # random prompt ids below 32,000 (valid in nearly every vocabulary), or below the local
        # tokenizer's size when --model names a smaller one here
        vocab = min(_local_vocab_size(args.model) or 32000, 32000)
        try:
            # one untimed request first (prompts of its own, seed 1): a server's first-request setup
            # is not the first row's time to first token
            endpoint_row(args.base_url, served, 16, 2, 1, vocab=vocab, api_key=key, timeout=args.timeout, seed=1)
            rows = [endpoint_row(args.base_url, served, isl, osl, b, vocab=vocab, api_key=key, timeout=args.timeout,
                                 label=label) for isl, osl in lengths for b in batches]
        except Exception as e:  # noqa: BLE001 - openai's errors, a dropped connection: one line, not a traceback
            raise BackendError(f"the endpoint failed during the benchmark: {type(e).__name__}: {e}") from None
        result = BenchResult(rows, {"endpoint": redact_url(args.base_url), "lengths": lengths, "batches": batches,
                                    "method": "total generated tokens / total latency, TTFT included"})
    else:
        result = run_bench(recipes, lengths, batches, model=args.model, dtype=args.dtype, device=args.device,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result.to_dict(), indent=2))
    print(format_tables(result, args.baseline))
    print(f"\nbench record: {out / 'bench.json'}")
    return 0


def _runs(args: argparse.Namespace) -> int:
    import datetime

    from .runindex import RunIndex, headline, index_path

    if args.since is not None:
        try:
            datetime.date.fromisoformat(args.since)
        except ValueError:
            raise ValueError(f"--since {args.since!r}: valid: a date as YYYY-MM-DD (e.g. 2026-11-01)") from None
    path = Path(args.index) if args.index else index_path()
    if not path.is_file():
        if args.index:
            raise ValueError(f"--index {args.index}: no run index there (each finished run is recorded in "
                             f"{index_path()} unless $EVALSUITE_INDEX names another)")
        print(f"(no runs yet: {path} does not exist)")
        return 0
    index = RunIndex(path)
    rows = index.query(task=args.task, model=args.model, recipe=args.recipe, since=args.since)
    gone = {r.id for r in rows if not (Path(r.run_dir) / "run.json").is_file()}
    if args.prune:
        index.remove(sorted(gone))
        rows = [r for r in rows if r.id not in gone]
    print(f"{'id':>4}  {'finished':<24} {'task':<11} {'model':<16} {'recipe':<15} {'status':<10} metrics / folder")
    for r in rows:
        print(f"{r.id:>4}  {r.finished:<24} {r.task:<11} {r.model[:16]:<16} {r.recipe:<15} {r.status:<10} "
              f"{headline(r)}\n      {r.run_dir}" + ("  (folder gone)" if r.id in gone else ""))
    if not rows:
        print("(no runs match)")
    if args.prune:
        print(f"pruned {len(gone)} run(s) whose folders are gone")
    elif gone:
        print(f"{len(gone)} run(s) listed have no folder any more; `evalsuite runs --prune` removes them from the index")
    return 0


def _local_vocab_size(model: str) -> int | None:
    """The vocabulary size of ``model``'s tokenizer when it names one here, else None."""
    from .engine.load import ModelLoadError, tokenizer_for

    try:
        return len(tokenizer_for(model))
    except (ModelLoadError, OSError, ValueError):
        return None


def _endpoint_backend(opts: argparse.Namespace):
    if opts.recipe != "bf16" or opts.recipe_config:
        raise ValueError("--recipe and --recipe-config apply to a model loaded here; an endpoint serves its "
                         "model as it is (start `evalsuite serve --recipe ...` for a recipe)")
    for flag, value in (("--concurrency", opts.concurrency), ("--prompts-per-request", opts.prompts_per_request)):
        if value < 1:
            raise ValueError(f"{flag}={value}; valid: an integer >= 1")
    from .backends.openai import OpenAIBackend, check_base_url

    check_base_url(opts.base_url)  # before transformers is imported and the tokenizer loads
    from .engine.load import ModelLoadError, tokenizer_for

    tokenizer = None
    if opts.tokenizer:
        tokenizer = tokenizer_for(opts.tokenizer)
    else:
        try:
            tokenizer = tokenizer_for(opts.model)
        except (ModelLoadError, OSError):
            tokenizer = None  # the served id names nothing here; generative tasks need no tokenizer
    backend = OpenAIBackend(opts.base_url, opts.model, tokenizer=tokenizer, api_key_env=opts.api_key_env,
                            concurrency=opts.concurrency, batch_size=opts.prompts_per_request,
                            timeout=opts.timeout, max_retries=opts.max_retries,
                            chat_template_kwargs=opts.chat_template_kwargs)
    backend.model_card()  # fails now, with the served ids, if the model is not there
    return backend


def parse_recipe_config(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--recipe-config takes KEY=VALUE, got {item!r}")
        if key in out:
            raise ValueError(f"--recipe-config {key} is given twice ({key}={json.dumps(out[key])} and {item}); "
                             "valid: each setting once")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value  # a bare string such as deploy
    return out


def parse_recipe_spec(spec: str) -> tuple[str, dict | None]:
    """``name`` or ``name:KEY=VALUE,KEY=VALUE`` (the benchmark scripts' recipe arguments): the
    recipe's name and its overrides, parsed as ``--recipe-config`` parses them."""
    name, _, settings = spec.partition(":")
    return name, parse_recipe_config(settings.split(",")) if settings else None


def run_name(model: str, recipe: str, task: str, job, extra: dict) -> str:
    """The default run folder: readable parts and a hash of what changes scores (the job's
    identity, the dtype, the recipe overrides), never of execution settings such as batch size."""
    key = json.dumps([job.identity(), extra], sort_keys=True, default=str)
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in model)
    return f"{safe}-{recipe}-{task}-{job.slug()}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _serve(args: argparse.Namespace) -> int:
    import os

    from .models import check_model_args, load_model_and_recipe

    overrides = parse_recipe_config(args.recipe_config)
    check_model_args(args.model, args.recipe, overrides, args.dtype, args.device, needs_tokenizer=True)
    for key in ("max_batch_size", "max_model_len", "max_prefill_tokens"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)}: must be >= 1")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError(f"--served-model-name {args.served_model_name!r}: valid: a non-empty id (default: the "
                         "model's name)")
    from .server.listen import listening_socket

    # the address is taken before the model loads: a port in use is an error in a second, not
    # after minutes of loading and quantizing, and no other process can take it meanwhile
    sock = listening_socket(args.host, args.port)
    from .server.serve import serve_forever, served_model  # torch and the HTTP stack, once the arguments are checked

    api_key = args.api_key or os.environ.get("EVALSUITE_API_KEY") or None
    lm, recipe = load_model_and_recipe(args.model, args.recipe, args.dtype, overrides, args.device)
    served = served_model(lm, recipe, args.served_model_name, max_batch_size=args.max_batch_size,
                          max_len=args.max_model_len, max_prefill_tokens=args.max_prefill_tokens,
                          prefix_cache=not args.no_prefix_cache)
    host, port = sock.getsockname()[:2]
    context = served.scheduler.max_len
    if context < args.max_model_len:  # the model's own context is the limit
        print(f"evalsuite: warning: --max-model-len {args.max_model_len} exceeds {served.name}'s context of "
              f"{context} tokens; serving {context}", file=sys.stderr)
    print(f"serving {served.name} (recipe {recipe['name']}, context {context} tokens) on http://{host}:{port}/v1"
          + (" (API key required)" if api_key else ""), file=sys.stderr, flush=True)
    serve_forever(served, sock, api_key)
    return 0


def _run_harness(argv: list[str]) -> int:
    """``evalsuite run --harness lm-eval --task NAME [--task NAME ...]``: lm-eval tasks through the
    suite's backend, written as the suite's own run records."""
    from .models import check_device_here, check_model_args, load_model_and_recipe

    parser = argparse.ArgumentParser(prog="evalsuite run --harness lm-eval", parents=[_run_options()])
    parser.add_argument("--harness", required=True, choices=["lm-eval"])
    parser.add_argument("--task", action="append", required=True,
                        help="an lm-eval task, group or tag (repeatable, or comma-separated as lm-eval's --tasks)")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (lm-eval's --limit)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--include-path", default=None,
                        help="a folder of task YAMLs of your own, beside lm-eval's and tasks/lm_eval")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="render each prompt with the model's chat template (lm-eval's --apply_chat_template)")
    parser.add_argument("--fewshot-as-multiturn", action="store_true",
                        help="with --apply-chat-template: few-shot examples as earlier chat turns")
    parser.add_argument("--system-instruction", default=None, help="a system message before each prompt")
    parser.add_argument("--gen-kwargs", default=None, metavar="KEY=VALUE,...",
                        help="generation settings over the tasks' own, as lm-eval's --gen_kwargs "
                             "(e.g. max_gen_toks=512,temperature=0)")
    opts = parser.parse_args(argv)
    opts.gen_kwargs = _parse_gen_kwargs(opts.gen_kwargs)
    opts.chat_template_kwargs = _parse_template_kwargs(opts.chat_template_kwargs)
    if opts.fewshot_as_multiturn and not opts.apply_chat_template:
        raise ValueError("--fewshot-as-multiturn needs --apply-chat-template (the turns are chat turns)")
    opts.task = list(dict.fromkeys(t.strip() for arg in opts.task for t in arg.split(",") if t.strip()))
    if opts.limit is not None and not opts.limit > 0:
        raise ValueError(f"--limit {opts.limit:g}; valid: a number of documents >= 1, or a fraction in (0, 1)")
    if opts.num_fewshot is not None and opts.num_fewshot < 0:
        raise ValueError(f"--num-fewshot {opts.num_fewshot}; valid: an integer >= 0")
    if opts.include_path is not None and not Path(opts.include_path).is_dir():
        raise ValueError(f"--include-path {opts.include_path!r}: not a folder (of lm-eval task YAMLs)")
    _output_folder("--output", opts.output)
    if not opts.base_url:
        overrides = parse_recipe_config(opts.recipe_config)
        check_model_args(opts.model, opts.recipe, overrides, opts.dtype, opts.device, needs_tokenizer=True)
        check_device_here(opts.device)  # before lm-eval builds its tasks
    from .runners.lm_eval_harness import format_lm_eval_summary, load_tasks, run_lm_eval, task_manager

    manager = task_manager(opts.task, opts.include_path)  # unknown tasks are named before a model loads
    if opts.apply_chat_template:
        _check_chat_template(opts.tokenizer or opts.model if opts.base_url else opts.model)
    if opts.base_url:
        backend = _endpoint_backend(opts)  # an unreachable endpoint is named before any data downloads
        load_tasks(manager, opts.task, opts.seed)
        name = run_name(opts.model, "endpoint", "lm-eval", _HarnessJob(opts), {"backend": backend.identity()})
    else:
        from .backends.engine import EngineBackend  # torch: imported once the arguments are checked

        load_tasks(manager, opts.task, opts.seed)  # tasks whose data cannot be loaded fail before the model loads
        lm, recipe = load_model_and_recipe(opts.model, opts.recipe, opts.dtype, overrides, opts.device)
        backend = EngineBackend(lm, recipe, max_batch_size=opts.batch_size, max_batch_tokens=opts.max_batch_tokens,
                                prefix_cache=not opts.no_prefix_cache, chat_template_kwargs=opts.chat_template_kwargs)
        name = run_name(lm.info.name, opts.recipe, "lm-eval", _HarnessJob(opts),
                        {"dtype": opts.dtype, "recipe_config": overrides, **_template_identity(opts)})
    out = Path(opts.output) if opts.output else DEFAULT_REPORTS / name
    result = run_lm_eval(backend, opts.task, out, limit=opts.limit, num_fewshot=opts.num_fewshot,
                         include_path=opts.include_path, seed=opts.seed, manager=manager, chat=_harness_chat(opts),
                         gen_kwargs=opts.gen_kwargs)
    _index_run(out, result.run)
    print(format_lm_eval_summary(result.metrics))
    print(f"\nrecords: {out / 'samples.jsonl'}\nrun record: {out / 'run.json'}")
    return 0


def _parse_template_kwargs(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not value:
        raise ValueError(f"--chat-template-kwargs {text!r}; valid: a JSON object of the chat template's variables, "
                         "e.g. '{\"enable_thinking\": false}'")
    return value


def _template_identity(opts: argparse.Namespace) -> dict:
    return {"chat_template_kwargs": opts.chat_template_kwargs} if opts.chat_template_kwargs else {}


def _parse_gen_kwargs(text: str | None) -> dict | None:
    """lm-eval's --gen_kwargs form, KEY=VALUE pairs separated by commas, values typed as lm-eval
    types them; None when not given."""
    if text is None:
        return None
    from lm_eval.utils import simple_parse_args_string

    pairs = [p for p in text.split(",") if p.strip()]
    if not pairs or any("=" not in p or not p.split("=", 1)[0].strip() for p in pairs):
        raise ValueError(f"--gen-kwargs {text!r}; valid: KEY=VALUE pairs separated by commas, as lm-eval's "
                         "--gen_kwargs (e.g. max_gen_toks=512,temperature=0)")
    return simple_parse_args_string(text)


def _check_chat_template(source: str) -> None:
    from .engine.load import ModelLoadError, tokenizer_for

    try:
        template = tokenizer_for(source).chat_template
    except (ModelLoadError, OSError, ValueError) as e:
        raise ValueError(f"--apply-chat-template needs the model's tokenizer here; {source!r}: {e}") from None
    if not template:
        raise ValueError(f"--apply-chat-template: the tokenizer of {source!r} has no chat template")


def _harness_chat(opts: argparse.Namespace):
    from .runners.lm_eval_harness import ChatFormat

    return ChatFormat(opts.apply_chat_template, opts.fewshot_as_multiturn, opts.system_instruction)


class _HarnessJob:
    def __init__(self, opts: argparse.Namespace):
        from .runners.lm_eval_harness import task_files_hash

        self.opts = opts
        self.task_files = task_files_hash(opts.include_path)

    def identity(self) -> dict:
        return {"tasks": sorted(self.opts.task), "limit": self.opts.limit, "num_fewshot": self.opts.num_fewshot,
                "seed": self.opts.seed, "task_files": self.task_files, **_harness_chat(self.opts).identity(),
                **({"gen_kwargs": self.opts.gen_kwargs} if self.opts.gen_kwargs else {})}

    def slug(self) -> str:
        return "-".join(sorted(self.opts.task))[:60]


def _lm_eval(argv: list[str]) -> int:
    """``evalsuite lm-eval --model evalsuite --model_args model=...,recipe=... --tasks ...``: lm-eval's
    CLI, unchanged, after registering the engine (lm-eval finds models only in its registry).
    The engine's model_args are checked first, before lm-eval loads its tasks."""
    _check_lm_eval_model_args(argv)
    from lm_eval.__main__ import cli_evaluate

    from .runners import lm_eval_model  # noqa: F401  (registers "evalsuite")
    from .taskdef import TASKS_DIR

    if "--include_path" not in argv and any(a.startswith("--tasks") for a in argv):
        argv = argv + ["--include_path", str(TASKS_DIR / "lm_eval")]  # the offline MMLU tasks
    saved = sys.argv
    sys.argv = ["lm-eval"] + argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def _option(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in an argument list (the last one given)."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a[len(name) + 1:]
    return value


# EvalsuiteLM's own keyword arguments; every other model_args key is a recipe setting
_LM_EVAL_ENGINE_ARGS = {"model", "recipe", "dtype", "batch_size", "max_batch_tokens", "max_length", "device",
                        "max_batch_size"}


def _check_lm_eval_model_args(argv: list[str]) -> None:
    """``--model evalsuite --model_args k=v,...`` (lm-eval's comma-separated form) checked as
    ``evalsuite run`` checks its options: model, recipe and settings, dtype, device."""
    if _option(argv, "--model") != "evalsuite":
        return
    pairs = [kv.partition("=") for kv in (_option(argv, "--model_args") or "").split(",") if kv]
    if any(not sep or not key for key, sep, _ in pairs):
        return  # not the k=v form: lm-eval parses and reports it
    args = {key: value for key, _, value in pairs}
    from .models import check_device_here, check_model_args

    overrides = parse_recipe_config([f"{k}={v}" for k, v in args.items() if k not in _LM_EVAL_ENGINE_ARGS])
    device = _option(argv, "--device") or args.get("device")
    check_model_args(args.get("model", "smollm2-135m"), args.get("recipe", "bf16"), overrides or None,
                     args.get("dtype", "bfloat16"), device, needs_tokenizer=True)
    # a device named here must exist: an 8B model must not run on the CPU by accident. Only
    # lm-eval's own default, cuda:0, falls back where there is no GPU (lm_eval_model._device)
    check_device_here(device)


def _quantize(args: argparse.Namespace) -> int:
    from .models import check_model_args, load_model_and_recipe

    overrides = parse_recipe_config(args.recipe_config)
    check_model_args(args.model, args.recipe, overrides, args.dtype, args.device)
    from .engine.options import source_kind
    from .models import folder_config
    from .quant.api import QUANT_FILE, check_hf_export, configured_recipe, hf_export_misfit  # the registry: no torch

    if args.format == "hf":
        check_hf_export(args.recipe)
        cfg = folder_config(args.model) if source_kind(args.model) == "folder" else None
        misfit = hf_export_misfit(args.recipe, dataclasses.asdict(configured_recipe(args.recipe, overrides).config),
                                  cfg)
        if misfit:
            raise ValueError(f"--format hf: {misfit}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out}: a file is there; valid: a new folder, an empty one, or a quantized "
                         "checkpoint folder to replace")
    if out.is_dir() and any(out.iterdir()) and not (out / QUANT_FILE).is_file():
        raise ValueError(f"--output {out}: the folder holds files that are no quantized checkpoint; valid: a new "
                         "folder, an empty one, or a quantized checkpoint folder to replace")
    from .quant.checkpoint import quantized_modules, save_hf, save_quantized  # torch: once the arguments are checked

    lm, recipe = load_model_and_recipe(args.model, args.recipe, args.dtype, overrides, args.device)
    out = (save_hf if args.format == "hf" else save_quantized)(lm, recipe, out)
    print(f"{len(quantized_modules(lm.model))} quantized modules, recipe {recipe['name']}: {out}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .plan import PLAN_GPUS, PLAN_RECIPES, check_gpu, check_recipe, model_config, plan

    model_config(args.model_config)
    recipes, gpus = args.recipe or list(PLAN_RECIPES), args.gpu or list(PLAN_GPUS)
    for name in recipes:
        check_recipe(name)
    for name in gpus:
        check_gpu(name)
    for recipe in recipes:
        for gpu in gpus:
            print(plan(args.model_config, recipe, gpu, args.context, args.batch, args.usable_fraction).summary())
    return 0


def _list_models() -> int:
    from .engine.config import PRESETS, SUPPORTED_ARCHITECTURES
    from .engine.options import DEFAULT_MODEL, MODELS

    for name, asset in MODELS.items():
        mark = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{mark}: {asset.package}=={asset.version} {asset.path}")
    print("\nalso accepted: an HF model folder (config.json + *.safetensors), a .gguf file, a hub id (online), "
          f"of the model types {', '.join(SUPPORTED_ARCHITECTURES)} (and gemma3's text model)")
    print("architecture presets (random-init / planning): " + ", ".join(PRESETS))
    return 0


def _list_tasks() -> int:
    from .taskdef import load_task

    for name in available_tasks():
        task = load_task(name)
        print(f"{name} (runner {task.runner}): {task.describe()}")
    return 0


def _list_recipes() -> int:
    from .quant.api import all_recipes

    for name, r in all_recipes().items():
        print(f"{name}: {r.description}")
        settings = dataclasses.asdict(r.config)
        if settings:
            print("  --recipe-config defaults: " + " ".join(
                f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in settings.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai"):  # a line per HTTP request is theirs at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"] and argv[1:2] in (["-h"], ["--help"]):  # argparse would take it for an unknown option
        print(_RUN_USAGE.format(tasks=", ".join(available_tasks())))
        return 0
    harness = argv[:1] == ["run"] and "--harness" in argv
    lm_eval = argv[:1] == ["lm-eval"]
    args = None if lm_eval else _build_parser().parse_args(argv if not harness else ["run"])
    from .assets import AssetError
    from .backends.base import BackendError
    from .engine.options import ModelLoadError
    from .records import RunConflictError

    try:
        if lm_eval:  # lm-eval parses its own options
            return _lm_eval(argv[1:])
        if harness:
            return _run_harness(argv[1:])
        if args.command == "run":
            return _run(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "gate":
            return _gate(args)
        if args.command == "runs":
            return _runs(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "report":
            return _report(args)
        if args.command == "study":
            from .quant.api import all_recipes
            from .study import plan_study, run_study

            _check_folder_name("--name", args.name)
            _output_folder(f"--root {args.root}, --name {args.name}", Path(args.root) / args.name)
            plan = plan_study(args.name, args.model, args.recipes or list(all_recipes()), full=args.full,
                              per_subject=args.per_subject, per_article=args.per_article, root=Path(args.root),
                              formulations=args.formulation, mtbench_questions=args.mt_bench,
                              mtbench_tokens=args.mt_bench_tokens, device=args.device, baseline=args.baseline)
            return run_study(plan, rebench=args.rebench)
        return {"models": _list_models, "tasks": _list_tasks, "recipes": _list_recipes}[args.command]()
    except (KeyError, ValueError, FileNotFoundError, AssetError, ModelLoadError, RunConflictError,
            BackendError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"evalsuite: error: {msg}", file=sys.stderr)
        # compare's 2 is INCONCLUSIVE; its errors exit 3, as gate's do
        return 3 if args is not None and args.command == "compare" else 2
    except BrokenPipeError:  # the reader went away (`evalsuite runs | head`): stop quietly, as `ls | head` does
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush at exit must not fail too
        return 141  # 128 + SIGPIPE, the shell's code for a writer killed by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
