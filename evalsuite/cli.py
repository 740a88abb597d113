"""The ``evalsuite`` command: parse arguments, call the library, print."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

from .taskdef import available_tasks

DEFAULT_REPORTS = Path("reports") / "runs"


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evalsuite", description="Accuracy evaluation of (quantized) LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a task on a model (resumes an interrupted run)")
    run.add_argument("task", help="task name (see `evalsuite tasks`)")
    run.add_argument("--model", default="smollm2-135m", help="registered name, HF folder, .gguf file or hub id")
    run.add_argument("--recipe", default="bf16", help="quantization recipe (see `evalsuite recipes`)")
    run.add_argument("--recipe-config", nargs="+", default=[], metavar="KEY=VALUE",
                     help="override recipe settings, values as JSON (e.g. kv_scale_mode=deploy)")
    run.add_argument("--dtype", default="bfloat16", help="engine dtype: bfloat16 (default) or float32")
    run.add_argument("--formulation", nargs="+", default=["letter", "cloze"],
                     help="MMLU formulations: letter, cloze, generative (default: letter cloze)")
    run.add_argument("--num-fewshot", type=int, default=0, help="exemplars per prompt, 0..5 (default 0)")
    run.add_argument("--per-subject", type=int, default=None,
                     help="stratified subset: questions per subject (default or 0: all 14,042)")
    run.add_argument("--subjects", nargs="+", default=None, help="restrict to these subjects")
    run.add_argument("--seed", type=int, default=1234)
    run.add_argument("--data", default="embedded", help="'embedded', a JSONL file, or a hub id (cais/mmlu)")
    run.add_argument("--batch-size", type=int, default=32, help="sequences per forward (default 32)")
    run.add_argument("--max-batch-tokens", type=int, default=4096, help="padded tokens per forward")
    run.add_argument("--output", default=None, help="run directory (default: reports/runs/<derived name>)")
    run.add_argument("--no-progress", action="store_true")

    qz = sub.add_parser("quantize", help="apply a recipe and save the quantized checkpoint")
    qz.add_argument("--model", default="smollm2-135m")
    qz.add_argument("--recipe", required=True)
    qz.add_argument("--recipe-config", nargs="+", default=[], metavar="KEY=VALUE")
    qz.add_argument("--dtype", default="bfloat16")
    qz.add_argument("--output", required=True, help="folder for config.json, model.safetensors, quantization.json")

    from .plan import PLAN_RECIPES

    pl = sub.add_parser("plan", help="fewest GPUs that hold a model's weights and KV cache under a recipe")
    pl.add_argument("--model-config", default="llama-3.1-405b", help="architecture preset (see `evalsuite models`)")
    pl.add_argument("--recipe", nargs="+", default=list(PLAN_RECIPES))
    pl.add_argument("--gpu", nargs="+", default=["h100", "h200"])
    pl.add_argument("--context", type=int, default=8192, help="tokens per sequence (default 8192)")
    pl.add_argument("--batch", type=int, default=1, help="sequences held at once (default 1)")
    pl.add_argument("--usable-fraction", type=float, default=0.9, help="share of GPU memory for weights + KV")

    sub.add_parser("models", help="list registered models")
    sub.add_parser("tasks", help="list tasks")
    sub.add_parser("recipes", help="list quantization recipes")
    return p


def _run(args: argparse.Namespace) -> int:
    from .quant.checkpoint import load_model_and_recipe
    from .runners.mmlu import MMLUConfig, run_mmlu

    if args.task not in available_tasks():
        raise KeyError(f"unknown task {args.task!r}; valid: {', '.join(available_tasks())}")
    cfg = MMLUConfig(formulations=tuple(args.formulation), num_fewshot=args.num_fewshot,
                     per_subject=args.per_subject or None, seed=args.seed,
                     subjects=tuple(args.subjects) if args.subjects else None, data=args.data,
                     batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens)
    lm, recipe = load_model_and_recipe(args.model, args.recipe, args.dtype, parse_recipe_config(args.recipe_config))
    out = Path(args.output) if args.output else DEFAULT_REPORTS / _run_name(args, lm.info.name)
    print(f"model {lm.info.name} ({lm.info.dtype}), recipe {args.recipe}, writing {out}", file=sys.stderr)
    result = run_mmlu(lm, cfg, out, recipe=recipe, progress=not args.no_progress)
    print(format_summary(result.metrics, result.run))
    print(f"\nrecords: {out / 'samples.jsonl'}\nrun record: {out / 'run.json'}")
    return 0


def parse_recipe_config(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--recipe-config takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value  # a bare string such as deploy
    return out


def _run_name(args: argparse.Namespace, model_name: str) -> str:
    key = json.dumps([args.formulation, args.num_fewshot, args.per_subject, args.subjects, args.seed,
                      args.data, args.dtype, args.recipe_config], sort_keys=True)
    subset = f"n{args.per_subject}" if args.per_subject else "full"
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in model_name)
    return f"{safe}-{args.recipe}-{args.task}-{args.num_fewshot}shot-{subset}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def format_summary(metrics: dict, run: dict) -> str:
    lines = [f"MMLU  {run['questions']} questions  ({run['data']['rejected_rows']} malformed rows rejected)"]
    for name, m in metrics.items():
        keys = ["acc"] + (["acc_norm"] if "acc_norm" in m else [])
        for key in keys:
            o = m[key]["overall"]
            lines.append(f"\n[{name}] {key}: {o['acc']:.4f} ± {_se(o['se'])}  (n={m['n']})")
            for cat, e in m[key]["categories"].items():
                lines.append(f"    {cat:<16} {e['acc']:.4f} ± {_se(e['se'])}  (n={e['n']})")
        share = ", ".join(f"{k} {v:.1%}" for k, v in m["prediction_share"].items())
        lines.append(f"    predictions: {share}")
        if "near_ties" in m:
            lines.append(f"    near ties (top-2 log-prob margin <= {m['near_tie_margin']}): {m['near_ties']}")
    lines.append("\nper-subject accuracy: see run.json -> metrics.<formulation>.acc.subjects")
    return "\n".join(lines)


def _se(se: float) -> str:
    return "n/a (1 question per subject)" if se != se else f"{se:.4f}"


def _quantize(args: argparse.Namespace) -> int:
    from .quant.checkpoint import load_model_and_recipe, quantized_modules, save_quantized

    lm, recipe = load_model_and_recipe(args.model, args.recipe, args.dtype, parse_recipe_config(args.recipe_config))
    out = save_quantized(lm, recipe, Path(args.output))
    print(f"{len(quantized_modules(lm.model))} quantized modules, recipe {recipe['name']}: {out}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .plan import plan

    for recipe in args.recipe:
        for gpu in args.gpu:
            print(plan(args.model_config, recipe, gpu, args.context, args.batch, args.usable_fraction).summary())
    return 0


def _list_models() -> int:
    from .engine.config import PRESETS
    from .engine.load import DEFAULT_MODEL, MODELS

    for name, asset in MODELS.items():
        mark = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{mark}: {asset.package}=={asset.version} {asset.path}")
    print("\nalso accepted: an HF model folder (config.json + *.safetensors), a .gguf file, a hub id (online)")
    print("architecture presets (random-init / planning): " + ", ".join(PRESETS))
    return 0


def _list_tasks() -> int:
    from .taskdef import load_task

    for name in available_tasks():
        task = load_task(name)
        print(f"{name}: formulations {', '.join(task.formulations)}; {len(task.categories)} subjects")
    return 0


def _list_recipes() -> int:
    from .quant.api import all_recipes

    for name, r in all_recipes().items():
        print(f"{name}: {r.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _build_parser().parse_args(argv)
    from .assets import AssetError
    from .engine.load import ModelLoadError
    from .records import RunConflictError

    try:
        if args.command == "run":
            return _run(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "quantize":
            return _quantize(args)
        return {"models": _list_models, "tasks": _list_tasks, "recipes": _list_recipes}[args.command]()
    except (KeyError, ValueError, FileNotFoundError, AssetError, ModelLoadError, RunConflictError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"evalsuite: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
