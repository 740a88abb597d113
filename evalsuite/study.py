"""`evalsuite study`: the reference case's study on any model, in one resumable command.

For every recipe: MMLU (letter and cloze) on a stratified subset and perplexity on a subset of
the prose corpus; then the throughput benchmark; then the comparison against the official FP8
recipe (or the recipe named by --baseline) and the report with its plots. Each run lives in its
own folder under the study's folder and resumes when the command is repeated; the benchmark is
kept once written (--rebench redoes it). The defaults fit the embedded model on 2 CPU cores in
about 15 minutes; ``--full`` is the full-size study (every MMLU question, every paragraph, the
note's lengths).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .records import unfinished_run

# The quick study: MMLU cloze (the formulation that carries the signal on a small model; letter is
# one flag away) on 2 questions per subject, one paragraph per article of the prose corpus, and
# one length pair for throughput. About 15 minutes for all six recipes on 2 CPU cores.
QUICK = {"per_subject": 2, "per_article": 1, "lengths": ["128/32"], "batches": [1, 16],
         "formulations": ["cloze"]}


@dataclass
class StudyPlan:
    name: str
    model: str
    recipes: list[str]
    folder: Path
    mmlu_args: list[str]
    perplexity_args: list[str]
    bench_args: list[str]
    mtbench_args: list[str] | None = None  # None: no MT-Bench part
    baseline: str = "fp8-official"  # the recipe the others are compared with (the reference case's)
    device_args: list[str] = field(default_factory=list)  # an execution setting: not part of any run's folder


def plan_study(name: str, model: str, recipes: list[str], *, full: bool, per_subject: int | None,
               per_article: int | None, root: Path, formulations: list[str] | None = None,
               mtbench_questions: int | None = None, mtbench_tokens: int | None = None,
               device: str | None = None, baseline: str | None = None) -> StudyPlan:
    from .models import check_device_here, check_model_args

    for r in recipes:  # every recipe against the model before the first run: none fails halfway through
        check_model_args(model, r, None, "bfloat16", device, needs_tokenizer=True)
    check_device_here(device)  # before the first run starts
    for flag, value in (("--per-subject", per_subject), ("--per-article", per_article),
                        ("--mt-bench", mtbench_questions), ("--mt-bench-tokens", mtbench_tokens)):
        if value is not None and value < 1:  # 0 would otherwise read as "the default" (or all 80 questions)
            raise ValueError(f"{flag} {value}: valid: an integer >= 1 (omit it for the default)")
    if baseline is None:
        if "fp8-official" not in recipes:
            raise ValueError(f"--recipes {recipes}: the study compares against fp8-official by default; include it, "
                             f"or name the baseline with --baseline (one of {recipes})")
        baseline = "fp8-official"
    elif baseline not in recipes:
        raise ValueError(f"--baseline {baseline}: not among --recipes {recipes}; valid: one of them")
    folder = root / name
    mmlu = ["--formulation", *(formulations or (["letter", "cloze"] if full else QUICK["formulations"]))]
    ppl: list[str] = []
    bench = []
    if not full:
        mmlu += ["--per-subject", str(per_subject or QUICK["per_subject"])]
        ppl += ["--per-article", str(per_article or QUICK["per_article"])]
        bench += ["--lengths", *QUICK["lengths"], "--batches", *map(str, QUICK["batches"])]
    else:
        if per_subject:
            mmlu += ["--per-subject", str(per_subject)]
        if per_article:
            ppl += ["--per-article", str(per_article)]
        bench += ["--note-lengths"]
    mtb = None
    if mtbench_questions is not None or full:
        mtb = (["--questions", str(mtbench_questions)] if mtbench_questions else []) + \
            (["--max-new-tokens", str(mtbench_tokens)] if mtbench_tokens else []) + \
            ([] if full else ["--calibration-questions", "10"])  # the judge's calibration: 10 of 30 when quick
    return StudyPlan(name, model, recipes, folder, mmlu, ppl, bench, mtb, baseline,
                     ["--device", device] if device else [])


def run_study(plan: StudyPlan, *, rebench: bool = False, log=lambda m: print(m, file=sys.stderr, flush=True)) -> int:
    from .cli import main as cli_main

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    runs: dict[str, list[Path]] = {"mmlu": [], "perplexity": []}
    for recipe in plan.recipes:
        for task, args in (("mmlu", plan.mmlu_args), ("perplexity", plan.perplexity_args)):
            # the folder names the options, so a study with other options never meets these runs
            tag = re.sub(r"[^0-9A-Za-z]+", "-", " ".join(args)).strip("-")
            out = plan.folder / "runs" / (f"{recipe}-{task}" + (f"-{tag}" if tag else ""))
            log(f"study {plan.name}: {task} under {recipe} -> {out}")
            t0 = time.perf_counter()
            rc = cli_main(["run", task, "--model", plan.model, "--recipe", recipe, *args, *plan.device_args,
                           "--output", str(out), "--no-progress"])
            timings[f"{recipe}/{task}"] = time.perf_counter() - t0
            if rc != 0:
                log(f"study {plan.name}: " + unfinished_run(f"{task} under {recipe}", rc, out))
                return rc
            runs[task].append(out)
    if plan.mtbench_args is not None:
        # BF16 answers first: every recipe is judged and measured against them (the judge-free
        # divergence teacher-forces them through both models).
        order = (["bf16"] if "bf16" in plan.recipes else []) + [r for r in plan.recipes if r != "bf16"]
        base_dir = None
        for recipe in order:
            tag = re.sub(r"[^0-9A-Za-z]+", "-", " ".join(plan.mtbench_args)).strip("-")
            out = plan.folder / "runs" / (f"{recipe}-mt-bench" + (f"-{tag}" if tag else ""))
            log(f"study {plan.name}: mt-bench under {recipe} -> {out}")
            t0 = time.perf_counter()
            extra = ["--baseline", str(base_dir)] if base_dir is not None else []
            rc = cli_main(["run", "mt-bench", "--model", plan.model, "--recipe", recipe, *plan.mtbench_args, *extra,
                           *plan.device_args, "--output", str(out), "--no-progress"])
            timings[f"{recipe}/mt-bench"] = time.perf_counter() - t0
            if rc != 0:
                log(f"study {plan.name}: " + unfinished_run(f"mt-bench under {recipe}", rc, out))
                return rc
            runs.setdefault("mt-bench", []).append(out)
            if recipe == "bf16":
                base_dir = out
    bench_dir = plan.folder / "bench"
    if rebench or not (bench_dir / "bench.json").is_file():
        t0 = time.perf_counter()
        rc = cli_main(["bench", "--model", plan.model, "--recipes", *plan.recipes, *plan.bench_args,
                       "--baseline", plan.baseline, *plan.device_args, "--output", str(bench_dir)])
        timings["bench"] = time.perf_counter() - t0
        if rc != 0:
            return rc
    t0 = time.perf_counter()
    rc = cli_main(["report", "report", *map(str, runs["mmlu"] + runs["perplexity"] + runs.get("mt-bench", [])),
                   "--bench", str(bench_dir), "--baseline", plan.baseline,
                   "--root", str(plan.folder)])
    timings["report"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    (plan.folder / "study.json").write_text(json.dumps({"model": plan.model, "recipes": plan.recipes,
                                                        "baseline": plan.baseline,
                                                        "mmlu_args": plan.mmlu_args,
                                                        "perplexity_args": plan.perplexity_args,
                                                        "mtbench_args": plan.mtbench_args,
                                                        "bench_args": plan.bench_args, "timings_s": timings},
                                                       indent=2))
    log(f"study {plan.name}: done in {timings['total']:.0f} s; report: {plan.folder / 'report' / 'report.html'}")
    return rc
