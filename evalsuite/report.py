"""`evalsuite report`: reports/<name>/ with report.md, a self-contained report.html (plots
embedded), the plots as PNG (matplotlib) and every table as CSV (pandas).

Built from run folders (accuracy), a bench folder (throughput) and published references; it
never runs a model. Contents:
  * accuracy against throughput: one point per recipe with its 95% interval, the baseline
    marked, the tolerance band drawn, one panel per accuracy metric; the published note's points
    in a panel of their own;
  * the verdict table (paired statistics, flips, McNemar, KL) per candidate and metric;
  * per-subject differences against the baseline (sorted bars with 95% intervals);
  * weight bytes, throughput, device, kernel path, package versions and the runs used.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .bench import BenchResult  # noqa: E402
from .compare import CandidateResult, Side, Tolerance, compare_sides  # noqa: E402
from .stats import mean_estimate  # noqa: E402

Z95 = 1.959963984540054


@dataclass
class Report:
    folder: Path
    tables: dict[str, pd.DataFrame]
    plots: dict[str, Path]
    verdict: str


def _metric_interval(m) -> tuple[float, float]:
    if m.se is None or m.se != m.se:
        return (m.value, m.value)
    if m.kind == "lower_is_better":
        return (m.value * math.exp(-Z95 * m.se), m.value * math.exp(Z95 * m.se))
    return (m.value - Z95 * m.se, m.value + Z95 * m.se)


def _throughput(bench: BenchResult | None, recipe: str) -> tuple[float | None, str]:
    if bench is None:
        return None, ""
    lengths = list(dict.fromkeys((r.isl, r.osl) for r in bench.rows))
    row = bench.best(recipe, *lengths[0]) if lengths else None
    return (row.tokens_per_s, f"{row.isl}/{row.osl}, batch {row.batch}") if row else (None, "")


def accuracy_table(baseline: Side, candidates: list[Side], bench: BenchResult | None) -> pd.DataFrame:
    rows = []
    for side in [baseline, *candidates]:
        tput, where = _throughput(bench, side.recipe)
        for name, m in sorted(side.metrics.items()):
            lo, hi = _metric_interval(m)
            rows.append({"recipe": side.label, "baseline": side is baseline, "metric": name, "kind": m.kind,
                         "value": m.value, "ci_low": lo, "ci_high": hi, "n": m.n,
                         "weight_bytes": side.info.get("weight_bytes"), "throughput_tok_s": tput,
                         "throughput_at": where, "kernel_path": side.info.get("kernel_path") or "",
                         "source": side.source})
    return pd.DataFrame(rows)


def verdict_table(results: list[CandidateResult]) -> pd.DataFrame:
    rows = []
    for res in results:
        for c in res.comparisons:
            rows.append({"candidate": res.candidate.label, "metric": c.metric, "baseline": c.baseline,
                         "candidate_value": c.candidate, "gain": c.gain,
                         "ci_low": c.interval[0] if c.interval else None,
                         "ci_high": c.interval[1] if c.interval else None,
                         "bootstrap_low": c.bootstrap[0] if c.bootstrap else None,
                         "bootstrap_high": c.bootstrap[1] if c.bootstrap else None,
                         "tolerance": c.tolerance, "verdict": c.verdict, "n": c.n, "method": c.method,
                         "right_to_wrong": c.flips["right_to_wrong"] if c.flips else None,
                         "wrong_to_right": c.flips["wrong_to_right"] if c.flips else None,
                         "mcnemar_p": c.flips["mcnemar_p"] if c.flips else None, "mean_kl": c.mean_kl,
                         "n_to_decide": c.n_to_decide,
                         "trtllm_verdict": c.trtllm["verdict"] if c.trtllm else None,
                         "vllm_verdict": c.vllm["verdict"] if c.vllm else None})
    return pd.DataFrame(rows)


def subject_table(baseline: Side, candidates: list[Side], metric: str) -> pd.DataFrame:
    """Per-subject (per-cluster) paired differences of ``metric``, candidate minus baseline."""
    rows = []
    base = baseline.metrics.get(metric)
    if base is None or not base.items:
        return pd.DataFrame(rows)
    for side in candidates:
        cand = side.metrics.get(metric)
        if cand is None or not cand.items:
            continue
        by_cluster: dict[str, list[float]] = {}
        for k, b in base.items.items():
            if k in cand.items:
                c = cand.items[k]
                by_cluster.setdefault(b.cluster, []).append(c.num / c.den - b.num / b.den)
        for cluster, diffs in by_cluster.items():
            est = mean_estimate(diffs)
            rows.append({"candidate": side.label, "subject": cluster, "difference": est.acc,
                         "ci_half": Z95 * est.se if est.se == est.se else 0.0, "n": est.n})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ plots

def plot_accuracy_vs_throughput(acc: pd.DataFrame, tolerances: dict[str, Tolerance], path: Path,
                                reference_sides: list[Side] | None = None) -> Path:
    metrics = [m for m in dict.fromkeys(acc["metric"]) if acc[acc.metric == m]["throughput_tok_s"].notna().any()]
    panels = len(metrics) + (1 if reference_sides else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(5.2 * max(panels, 1), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        d = acc[(acc.metric == metric) & acc.throughput_tok_s.notna()]
        for _, r in d.iterrows():
            ax.errorbar(r.throughput_tok_s, r.value, yerr=[[r.value - r.ci_low], [r.ci_high - r.value]],
                        fmt="*" if r.baseline else "o", ms=14 if r.baseline else 7, capsize=3,
                        color="black" if r.baseline else None, label=r.recipe + (" (baseline)" if r.baseline else ""))
        base = d[d.baseline]
        tol = _tolerance_for(metric, tolerances)
        if len(base) and tol is not None:
            bv = float(base.value.iloc[0])
            if d.kind.iloc[0] == "lower_is_better":
                edge = bv * (1 + (tol.value if tol.relative else tol.value / bv))
                ax.axhspan(min(d.ci_low.min(), bv), edge, color="green", alpha=0.08, label="within tolerance")
            else:
                edge = bv - (tol.value * abs(bv) if tol.relative else tol.value)
                ax.axhspan(edge, max(d.ci_high.max(), bv), color="green", alpha=0.08, label="within tolerance")
            ax.axhline(edge, color="green", lw=0.8, ls="--")
        ax.set_xlabel("output tokens/s (max throughput)")
        ax.set_ylabel(metric + (" (lower is better)" if d.kind.iloc[0] == "lower_is_better" else ""))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if reference_sides:
        ax = axes[0][len(metrics)]
        for side in reference_sides:
            t = side.info.get("throughput") or {}
            if not t:
                continue
            x = t["max_throughput"][0]
            for metric, marker in (("mmlu", "o"), ("mt_bench", "s")):
                if metric in side.metrics:
                    v = side.metrics[metric].value
                    y = v * 10 if metric == "mmlu" else v
                    ax.plot(x, y, marker, ms=8, label=f"{side.recipe} {metric}"
                            + (" (x10)" if metric == "mmlu" else ""))
        ax.set_xlabel("output tokens/s, ISL/OSL 2048/128 (as published)")
        ax.set_ylabel("MT-Bench; MMLU x 10")
        ax.set_title("Published: Llama 3.1 405B on H200")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_subjects(subjects: pd.DataFrame, metric: str, path: Path) -> Path | None:
    if subjects.empty:
        return None
    cands = list(dict.fromkeys(subjects.candidate))
    fig, axes = plt.subplots(len(cands), 1, figsize=(10, 3.2 * len(cands)), squeeze=False)
    for ax, cand in zip(axes[:, 0], cands):
        d = subjects[subjects.candidate == cand].sort_values("difference")
        colors = ["tab:red" if v < 0 else "tab:blue" for v in d.difference]
        ax.bar(range(len(d)), d.difference, yerr=d.ci_half, color=colors, capsize=1.5, error_kw={"lw": 0.6})
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(range(len(d)))
        ax.set_xticklabels(d.subject, rotation=90, fontsize=6)
        ax.set_ylabel("difference")
        ax.set_title(f"{metric}: {cand} minus baseline, per subject (95% intervals)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _tolerance_for(metric: str, tolerances: dict[str, Tolerance]) -> Tolerance | None:
    parts = metric.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in tolerances:
            return tolerances[".".join(parts[:i])]
    return None


# ------------------------------------------------------------------------------------ writing

def build_report(name: str, baseline: Side, candidates: list[Side], tolerances: dict[str, Tolerance], *,
                 default: Tolerance, bench: BenchResult | None = None, reference_sides: list[Side] | None = None,
                 root: Path = Path("reports"), extra_text: str = "") -> Report:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    results = compare_sides(baseline, candidates, tolerances, default)
    acc = accuracy_table(baseline, candidates, bench)
    ver = verdict_table(results)
    tables = {"accuracy": acc, "verdicts": ver}
    if bench is not None:
        tables["throughput"] = pd.DataFrame([{**{k: v for k, v in r.__dict__.items() if k not in ("ttft_ms", "itl_ms")},
                                              **{f"ttft_{k}_ms": v for k, v in r.ttft_ms.items()},
                                              **{f"itl_{k}_ms": v for k, v in r.itl_ms.items()}} for r in bench.rows])
    plots = {"accuracy_vs_throughput": plot_accuracy_vs_throughput(
        acc, _with_default(acc, tolerances, default), folder / "accuracy_vs_throughput.png", reference_sides)}
    for metric in sorted({m for m in acc.metric if m.startswith("mmlu")}):
        subj = subject_table(baseline, candidates, metric)
        if not subj.empty:
            tables[f"subjects_{metric}"] = subj
            p = plot_subjects(subj, metric, folder / f"subjects_{metric}.png")
            if p:
                plots[f"subjects_{metric}"] = p
    for key, df in tables.items():
        df.to_csv(folder / f"{key}.csv", index=False)
    from .compare import overall

    verdict = overall([r.verdict for r in results])
    meta = _meta(baseline, candidates, bench)
    (folder / "report.md").write_text(_markdown(name, verdict, results, tables, plots, meta, extra_text))
    (folder / "report.html").write_text(_html(name, verdict, tables, plots, meta, extra_text))
    (folder / "report.json").write_text(json.dumps({"verdict": verdict, "meta": meta}, indent=2, default=str))
    return Report(folder, tables, plots, verdict)


def _with_default(acc: pd.DataFrame, tolerances: dict[str, Tolerance], default: Tolerance) -> dict[str, Tolerance]:
    out = dict(tolerances)
    for m in set(acc.metric):
        if _tolerance_for(m, out) is None:
            out[m] = default
    return out


def _meta(baseline: Side, candidates: list[Side], bench: BenchResult | None) -> dict[str, Any]:
    from .records import package_versions

    sides = [baseline, *candidates]
    return {"generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "baseline": baseline.label,
            "setup": _setups(sides),
            "runs": [{"label": s.label, "source": s.source, "device": s.info.get("device"),
                      "kernel_path": s.info.get("kernel_path"), "weight_bytes": s.info.get("weight_bytes")}
                     for s in sides],
            "bench_devices": sorted({r.device for r in bench.rows}) if bench else [],
            "bench_kernel_paths": {r.recipe: r.kernel_path for r in bench.rows} if bench else {},
            "versions": package_versions()}


def _setups(sides: list[Side]) -> dict[str, dict[str, Any]]:
    """Per task the sides ran: the setup they share (compare refuses sides whose setups differ)
    and which items each ran."""
    out: dict[str, dict[str, Any]] = {}
    for side in sides:
        for m in side.metrics.values():
            if m.setup and m.setup["task"] not in out:
                out[m.setup["task"]] = {"shared": {k: v for k, v in m.setup.items() if k != "task"}, "selection": {}}
    for task, entry in out.items():
        for side in sides:
            if f"selection.{task}" in side.info:
                entry["selection"][side.label] = side.info[f"selection.{task}"]
    return out


def _setup_lines(setups: dict[str, dict[str, Any]]) -> list[str]:
    def show(d: dict[str, Any]) -> str:
        def value(k: str, v: Any) -> str:
            return v[:12] if k.endswith("sha256") and isinstance(v, str) else json.dumps(v, default=str)
        return ", ".join(f"{k} {value(k, v)}" for k, v in d.items() if v is not None) or "defaults"

    lines = []
    for task, entry in setups.items():
        lines.append(f"- {task}: {show(entry['shared'])}")
        selections = entry["selection"]
        if len({json.dumps(v, sort_keys=True, default=str) for v in selections.values()}) == 1:
            lines.append(f"  - items, every side: {show(next(iter(selections.values())))}")
        else:
            lines += [f"  - items, {label}: {show(v)}" for label, v in selections.items()]
    return lines


PUBLISHED_HEADING = "Published reference (its own figures, not measured here)"
COUNT_COLUMNS = ("right_to_wrong", "wrong_to_right", "n", "n_to_decide")


def _shown(df: pd.DataFrame) -> pd.DataFrame:
    """A table as read: counts as integers, an empty cell where a figure does not apply (a
    perplexity has no flips) rather than "nan"."""
    out = df.copy()
    for col in COUNT_COLUMNS:
        if col in out:
            out[col] = out[col].astype("Int64")
    return out.astype(object).where(out.notna(), "")


def _markdown(name, verdict, results, tables, plots, meta, extra_text) -> str:
    lines = [f"# {name}", "", f"Overall verdict: **{verdict}** (baseline: {meta['baseline']}). Generated "
             f"{meta['generated']}.", ""]
    if extra_text:  # the published references' figures, aligned as printed
        lines += [f"## {PUBLISHED_HEADING}", "", "```text", extra_text, "```", ""]
    lines += [f"![accuracy vs throughput]({plots['accuracy_vs_throughput'].name})", ""]
    if meta["setup"]:
        lines += ["## Setup", "", *_setup_lines(meta["setup"]), ""]
    lines += ["## Verdicts", ""]
    v = tables["verdicts"]
    if not v.empty:
        cols = ["candidate", "metric", "baseline", "candidate_value", "gain", "ci_low", "ci_high", "tolerance",
                "verdict", "right_to_wrong", "wrong_to_right", "mcnemar_p", "mean_kl", "trtllm_verdict", "vllm_verdict"]
        lines += [_shown(v[cols]).to_markdown(index=False, floatfmt=".4f"), ""]
    explain = [(r.candidate.label, c) for r in results for c in r.comparisons if c.verdict != "PASS"]
    for label, c in explain:
        more = f"; about {c.n_to_decide} paired items would decide it" if c.n_to_decide else ""
        lines.append(f"- {c.verdict}: {label} {c.metric}: {c.reason} ({c.method}){more}")
    lines += ["", "## Accuracy, weights and throughput", "",
              _shown(tables["accuracy"].drop(columns=["source"])).to_markdown(index=False, floatfmt=".4f"), ""]
    if "throughput" in tables:
        t = tables["throughput"][["recipe", "isl", "osl", "batch", "tokens_per_s", "ttft_p50_ms", "ttft_p90_ms",
                                   "ttft_p99_ms", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "kernel_path"]]
        lines += ["## Throughput", "", _shown(t).to_markdown(index=False, floatfmt=".1f"), ""]
    for key, path in plots.items():
        if key.startswith("subjects_"):
            lines += [f"## Per-subject differences: {key[len('subjects_'):]}", "", f"![{key}]({path.name})", ""]
    lines += ["## Provenance", "", f"Bench device: {', '.join(meta['bench_devices']) or 'no bench'}", ""]
    for r in meta["runs"]:
        lines.append(f"- {r['label']}: {r['source']} (device {r['device']}, kernel path {r['kernel_path']})")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), ""]
    return "\n".join(lines)


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _html(name, verdict, tables, plots, meta, extra_text) -> str:
    def table(df: pd.DataFrame) -> str:
        buf = io.StringIO()
        _shown(df).to_html(buf, index=False, float_format=lambda x: f"{x:.4f}", border=0, classes="t")
        return buf.getvalue()

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title><style>"
             "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table.t{border-collapse:collapse;"
             "font-size:12px}table.t td,table.t th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
             "</style></head><body>",
             f"<h1>{html.escape(name)}</h1><p>Overall verdict: <b>{verdict}</b> (baseline "
             f"{html.escape(meta['baseline'])}). Generated {meta['generated']}.</p>"]
    if extra_text:
        parts.append(f"<h2>{PUBLISHED_HEADING}</h2><pre>{html.escape(extra_text)}</pre>")
    if meta["setup"]:
        parts.append("<h2>Setup</h2><pre>" + html.escape("\n".join(_setup_lines(meta["setup"]))) + "</pre>")
    for key, path in plots.items():
        parts.append(f"<h2>{html.escape(key.replace('_', ' '))}</h2>"
                     f"<img alt='{path.name}' data-file='{path.name}' src='{_png_data_uri(path)}'>")
    for key, df in tables.items():
        parts.append(f"<h2>{html.escape(key)}</h2>" + table(df))
    parts.append("<h2>Provenance</h2><pre>" + html.escape(json.dumps(meta, indent=2, default=str)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
