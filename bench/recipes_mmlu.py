"""MMLU 0-shot for every recipe on the embedded model, both formulations, compared with BF16.

    python bench/recipes_mmlu.py --per-subject 20 --out docs/RESULTS.md
    python bench/recipes_mmlu.py --per-subject 0                        # the full 14,042 (hours)
    python bench/recipes_mmlu.py --per-subject 0 --report-only          # the table of the finished runs

A recipe may carry overrides, ``NAME:KEY=VALUE[,KEY=VALUE]`` (``fp8-modelopt:kv_scale_mode=deploy``).
Each recipe's run lives in reports/results/<subset>/<recipe>/ and resumes when rerun. The table
gives, per recipe and formulation: accuracy (subject-weighted, ± SE), its difference from BF16's
over the same questions with the paired standard error (weighted alike), the share of questions whose
prediction differs from BF16, the mean KL divergence of the four-choice distribution from
BF16's, the share of "A" predictions, and the recipe's deployed weight bytes. A second table gives,
for each pair of recipes, the share of questions on which their predictions differ.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from evalsuite.cli import parse_recipe_spec
from evalsuite.models import load_model_and_recipe
from evalsuite.runners.mmlu import MMLUConfig, load_mmlu, run_mmlu
from evalsuite.stats import paired_accuracy_difference, paired_changes
from evalsuite.taskdef import load_task

RECIPES = ("bf16", "fp8-official", "fp8-modelopt", "fp8-modelopt:kv_scale_mode=deploy", "int4-awq", "int4-rtn",
           "int4-awq-asym")
FORMULATIONS = ("letter", "cloze")


def records_by_formulation(run_dir: Path) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for line in open(run_dir / "samples.jsonl"):
        r = json.loads(line)
        out.setdefault(r["formulation"], {})[r["id"]] = r
    return out


def _finished_run(run_dir: Path) -> dict | None:
    """run.json of a complete run in ``run_dir`` (its metrics and recipe record), else None."""
    path = run_dir / "run.json"
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    return run if run.get("status") == "complete" and set(FORMULATIONS) <= set(run.get("metrics", {})) else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-subject", type=int, default=20, help="questions per subject; 0 for all")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    p.add_argument("--out", default=None,
                   help="also put the tables into this markdown file, between the markers "
                        "<!-- recipes_mmlu SUBSET begin/end --> (SUBSET: n5, full, ...) if it has them")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: tabulate the recipes whose runs are complete, list the others")
    args = p.parse_args()
    subset = f"n{args.per_subject}" if args.per_subject else "full"
    cfg = MMLUConfig(formulations=FORMULATIONS, per_subject=args.per_subject or None)
    rows, base, by_recipe, unfinished = [], None, {}, []
    weights = load_mmlu(load_task("mmlu"), cfg.data).subject_sizes()  # as the accuracies are weighted
    for recipe in ["bf16"] + [r for r in args.recipes if r != "bf16"]:
        run_dir = Path("reports/results") / subset / recipe
        if args.report_only:
            run = _finished_run(run_dir)
            if run is None:
                if recipe == "bf16":
                    raise SystemExit(f"no complete BF16 run in {run_dir}: nothing to compare against")
                unfinished.append(recipe)
                continue
            metrics, record = run["metrics"], run["recipe"]
        else:
            name, overrides = parse_recipe_spec(recipe)
            t = time.perf_counter()
            lm, record = load_model_and_recipe("smollm2-135m", name, "bfloat16", overrides)
            t_apply = time.perf_counter() - t
            t = time.perf_counter()
            metrics = run_mmlu(lm, cfg, run_dir, recipe=record, progress=False).metrics
            print(f"{recipe}: applied in {t_apply:.0f} s, evaluated in {time.perf_counter() - t:.0f} s", flush=True)
        recs = by_recipe[recipe] = records_by_formulation(run_dir)
        if recipe == "bf16":
            base = recs
        for form in FORMULATIONS:
            m = metrics[form]
            ch = paired_changes(base[form], recs[form])
            ch["diff"] = paired_accuracy_difference(base[form], recs[form], weights)
            acc = m["acc"]["overall"]
            norm = m.get("acc_norm", {}).get("overall")
            share_a = sum(r["prediction"] == 0 for r in recs[form].values()) / len(recs[form])
            rows.append((recipe, form, acc, norm, ch, record["deployed_weight_bytes"], share_a))
    n = rows[0][4]["n"]
    lines = [f"MMLU 0-shot, SmolLM2-135M-Instruct (dequantized Q4_1 as the BF16 baseline), "
             f"{'all ' + str(n) if not args.per_subject else f'{args.per_subject} per subject, {n}'} questions.",
             "", "| recipe | formulation | accuracy | acc_norm | Δ accuracy vs BF16 (paired SE) | changed vs BF16 | "
                 "mean KL vs BF16 (nats) | \"A\" predictions | weight bytes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for recipe, form, acc, norm, ch, wbytes, share_a in rows:
        norm_s = f"{norm['acc']:.4f} ± {norm['se']:.4f}" if norm else "—"
        diff_s = "—" if recipe == "bf16" else f"{ch['diff'].acc:+.4f} ({ch['diff'].se:.4f})"
        lines.append(f"| {recipe} | {form} | {acc['acc']:.4f} ± {acc['se']:.4f} | {norm_s} | {diff_s} | "
                     f"{ch['changed_share']:.2%} ({ch['changed']}) | {ch['mean_kl']:.5f} | {share_a:.1%} | "
                     f"{wbytes / 1e6:.1f} MB |")
    variants = [r for r in by_recipe if ":" in r and r.partition(":")[0] in by_recipe]
    if variants:  # a recipe with overrides against the recipe's defaults
        lines += ["", "| variant | against | formulation | changed | mean KL (nats) |", "| --- | --- | --- | --- | --- |"]
        for v in variants:
            for form in FORMULATIONS:
                ch = paired_changes(by_recipe[v.partition(":")[0]][form], by_recipe[v][form])
                lines.append(f"| {v} | {v.partition(':')[0]} | {form} | {ch['changed_share']:.2%} ({ch['changed']}) | "
                             f"{ch['mean_kl']:.5f} |")
    names = [r for r in by_recipe if ":" not in r]
    if len(names) > 2:  # how often each pair of recipes disagrees (e.g. the two FP8 recipes)
        lines += ["", "Share of questions on which two recipes predict differently:", "",
                  "| formulation | " + " | ".join(names[1:]) + " |", "| --- " * len(names) + "|"]
        for form in FORMULATIONS:
            for a in names[:-1]:
                cells = [f"{paired_changes(by_recipe[a][form], by_recipe[b][form])['changed_share']:.1%}"
                         if names.index(b) > names.index(a) else "" for b in names[1:]]
                lines.append(f"| {form}: {a} | " + " | ".join(cells) + " |")
    if unfinished:
        lines += ["", "Not finished yet (resumable): " + ", ".join(unfinished) + "."]
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_between_markers(Path(args.out), subset, table)


def write_between_markers(path: Path, subset: str, table: str) -> None:
    """Replace the block between this subset's markers in ``path`` (prose around it stays), or
    write the table alone to a file without them."""
    begin, end = f"<!-- recipes_mmlu {subset} begin -->", f"<!-- recipes_mmlu {subset} end -->"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1]
    else:
        text = table + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
