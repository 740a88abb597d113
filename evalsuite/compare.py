"""Verdicts: does a candidate hold the baseline's accuracy within tolerance?

Sides are run folders (their run.json and samples.jsonl) or published references
(evalsuite.references). Each side offers metrics; a metric has a kind:

  * ``accuracy``: 0/1 per question (MMLU), higher is better;
  * ``score``: a rating per item (MT-Bench's 1-10), higher is better;
  * ``lower_is_better``: a loss ratio (perplexity: negative log-likelihood per word), compared on
    the log scale, so differences and tolerances are relative.

Every metric with per-item records is a ratio sum(num) / sum(den) over its items (an accuracy:
weighted 0/1 over weights; a log-perplexity: NLL over words; a score: scores over ones). When
both sides hold the same items, the candidate-minus-baseline difference is the ratio of the
paired differences, sum(num_c - num_b) / sum(den), with the delta-method standard error clustered
by the item's cluster (MMLU subject, perplexity article), a t interval on (clusters - 1) degrees
of freedom, and a seeded cluster bootstrap as a second interval ("Adding Error Bars to Evals",
arXiv 2411.00640). For 0/1 items: flips right->wrong and wrong->right, McNemar's exact test, and
the mean KL of the answer distributions ("Accuracy is Not All You Need", arXiv 2407.09141).
Runs of lm-eval tasks pair their documents the same way (``_lm_eval_metrics``).

The verdict is a non-inferiority test at the metric's tolerance: PASS when the whole interval
of the gain (the difference, signed so that positive is better) lies above -tolerance, FAIL when
it lies wholly below, INCONCLUSIVE otherwise, with the number of items that would decide it at
the observed variance. Beside it, what two widely used CI checks conclude on the same numbers:
TensorRT-LLM's accuracy test (unpaired one-sided test at alpha 0.05, beta 0.2, its stored
sigma 0.5 for 0/1 tasks) and vLLM's lm-eval check (np.isclose with rtol 0.08 on one run).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from .stats import choice_distribution, kl_divergence, ratio_estimate

log = logging.getLogger(__name__)

KINDS = ("accuracy", "score", "lower_is_better")
PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"
EXIT_CODES = {PASS: 0, FAIL: 1, INCONCLUSIVE: 2}  # `evalsuite compare` and `evalsuite gate`; 3 is an error
TRTLLM_ALPHA, TRTLLM_BETA, TRTLLM_SIGMA_01 = 0.05, 0.2, 0.5
VLLM_RTOL = 0.08
BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED = 2000, 0


@dataclass(frozen=True)
class Item:
    num: float
    den: float = 1.0
    cluster: str = ""
    dist: tuple[float, ...] | None = None  # answer distribution, for KL


@dataclass
class Metric:
    name: str
    kind: str
    value: float  # in the metric's own units (accuracy, score, perplexity)
    se: float | None = None  # of ``log(value)`` for lower_is_better, of ``value`` otherwise
    n: int | None = None
    items: dict[str, Item] | None = None
    setup: dict[str, Any] | None = None  # how the run ran its task (``run_setup``); None for references

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name!r} has kind {self.kind!r}; valid: {', '.join(KINDS)}")


@dataclass
class Side:
    label: str
    recipe: str
    source: str  # a run folder, or ref:<file>:<recipe>
    metrics: dict[str, Metric]
    info: dict[str, Any] = field(default_factory=dict)  # model, device, weight bytes, throughput, ...


@dataclass(frozen=True)
class Tolerance:
    """How far below the baseline a candidate may be. ``max_flip_rate`` and ``max_kl`` optionally
    bound how far its answers may move at all (share of changed correctness, mean KL of the answer
    distributions): on a model near chance, a broken recipe hardly moves accuracy but changes
    most answers."""

    value: float
    relative: bool = False
    max_flip_rate: float | None = None
    max_kl: float | None = None

    @classmethod
    def parse(cls, spec: Any, where: str) -> Tolerance:
        """A bare number (absolute), or ``{absolute: X}`` / ``{relative: X}`` with optional
        ``max_flip_rate`` and ``max_kl``."""
        if isinstance(spec, (int, float)) and spec >= 0:
            return cls(float(spec))
        if isinstance(spec, dict):
            kinds = [k for k in spec if k in ("absolute", "relative")]
            limits = {k: spec[k] for k in spec if k in ("max_flip_rate", "max_kl")}
            numbers = all(isinstance(v, (int, float)) and v >= 0 for v in spec.values())
            if len(kinds) == 1 and len(kinds) + len(limits) == len(spec) and numbers:
                return cls(float(spec[kinds[0]]), kinds[0] == "relative", **{k: float(v) for k, v in limits.items()})
        raise ValueError(f"{where}: tolerance {spec!r}; valid: a number >= 0, {{absolute: X}} or {{relative: X}}, "
                         "optionally with max_flip_rate and max_kl")

    def on_gain_scale(self, kind: str, base_value: float) -> float:
        """The tolerance on the scale the gain is measured on (log scale for lower_is_better)."""
        if kind == "lower_is_better":
            rel = self.value if self.relative else self.value / base_value
            return math.log1p(rel)
        return self.value * abs(base_value) if self.relative else self.value

    def describe(self) -> str:
        return f"{self.value:g}" + ("rel" if self.relative else "")


# ------------------------------------------------------------------------------------ statistics

def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: discordant pairs b and c under Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _interval(est_mean: float, se: float, df: int) -> tuple[float, float]:
    if not se == se or df < 1:  # nan: a single cluster has no variance estimate
        return (float("nan"), float("nan"))
    from scipy import stats  # about a second to import: only once an interval is computed

    t = float(stats.t.ppf(0.975, df))
    return (est_mean - t * se, est_mean + t * se)


def cluster_bootstrap(nums: np.ndarray, dens: np.ndarray, clusters: list[str], *,
                      samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile interval of sum(num)/sum(den), resampling clusters with replacement."""
    keys = sorted(set(clusters))
    index = {k: i for i, k in enumerate(keys)}
    g = np.array([index[c] for c in clusters])
    s_num = np.bincount(g, weights=nums, minlength=len(keys))
    s_den = np.bincount(g, weights=dens, minlength=len(keys))
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(keys), size=(samples, len(keys)))
    ratios = s_num[pick].sum(axis=1) / s_den[pick].sum(axis=1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


@dataclass
class Comparison:
    metric: str
    kind: str
    tolerance: str
    baseline: float
    candidate: float
    gain: float  # positive is better; log-ratio for lower_is_better
    interval: tuple[float, float] | None
    method: str
    verdict: str
    reason: str
    n: int | None = None
    clusters: int | None = None
    bootstrap: tuple[float, float] | None = None
    n_to_decide: int | None = None
    flips: dict[str, Any] | None = None
    mean_kl: float | None = None
    trtllm: dict[str, Any] | None = None
    vllm: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _verdict(gain: float, lo: float, hi: float, tol: float) -> str:
    if lo > -tol:
        return PASS
    if hi < -tol:
        return FAIL
    return INCONCLUSIVE


def compare_metric(base: Metric, cand: Metric, tol: Tolerance) -> Comparison:
    if base.kind != cand.kind:
        raise ValueError(f"metric {base.name!r} is {base.kind} on one side and {cand.kind} on the other")
    check_same_setup(base, cand)
    kind = base.kind
    sign = -1.0 if kind == "lower_is_better" else 1.0
    scale = (lambda v: math.log(v)) if kind == "lower_is_better" else (lambda v: v)
    point_gain = sign * (scale(cand.value) - scale(base.value))
    t = tol.on_gain_scale(kind, base.value)
    common = sorted(set(base.items) & set(cand.items)) if base.items and cand.items else []
    out = Comparison(metric=base.name, kind=kind, tolerance=tol.describe(), baseline=base.value, candidate=cand.value,
                     gain=point_gain, interval=None, method="", verdict=INCONCLUSIVE, reason="")
    if common:
        b_items, c_items = [base.items[k] for k in common], [cand.items[k] for k in common]
        dens = np.array([i.den for i in b_items])
        diffs = np.array([c.num - b.num for b, c in zip(b_items, c_items)])
        clusters = [i.cluster for i in b_items]
        est = ratio_estimate(list(diffs), list(dens), clusters)
        groups = len(set(clusters))
        lo, hi = _interval(est.acc, est.se, groups - 1)
        boot = cluster_bootstrap(diffs, dens, clusters)
        gain, (glo, ghi) = sign * est.acc, sorted((sign * lo, sign * hi))
        out.gain, out.interval, out.n, out.clusters = gain, (glo, ghi), len(common), groups
        out.bootstrap = tuple(sorted((sign * boot[0], sign * boot[1])))
        out.method = f"paired, clustered by {groups} clusters" if groups < len(common) else "paired"
        if glo == glo:
            out.verdict = _verdict(gain, glo, ghi, t)
            margin = gain + t
            if out.verdict == INCONCLUSIVE and margin != 0 and est.se > 0:
                # the items at which the interval's half-width (the same t quantile, the same
                # variance per item) shrinks to the distance from the gain to the margin: at least
                # the items there are, since an undecided interval is wider than that distance
                half_width = (hi - lo) / 2
                out.n_to_decide = math.ceil(len(common) * (half_width / abs(margin)) ** 2)
            out.reason = (f"95% interval of the gain [{glo:+.4f}, {ghi:+.4f}] "
                          + {PASS: "lies above", FAIL: "lies below", INCONCLUSIVE: "straddles"}[out.verdict]
                          + f" -{t:.4f}")
        else:
            out.reason = "one cluster only: no variance estimate"
        if kind == "accuracy" and all(i.num in (0.0, i.den) for i in b_items + c_items):
            rw = sum(1 for b, c in zip(b_items, c_items) if b.num > 0 and c.num == 0)
            wr = sum(1 for b, c in zip(b_items, c_items) if b.num == 0 and c.num > 0)
            out.flips = {"right_to_wrong": rw, "wrong_to_right": wr, "rate": (rw + wr) / len(common),
                         "right_to_wrong_rate": rw / len(common), "wrong_to_right_rate": wr / len(common),
                         "mcnemar_p": mcnemar_exact(rw, wr)}
        if all(i.dist for i in b_items + c_items):
            out.mean_kl = float(np.mean([kl_divergence(list(b.dist), list(c.dist)) for b, c in zip(b_items, c_items)]))
        moved = []
        if tol.max_flip_rate is not None and out.flips and out.flips["rate"] > tol.max_flip_rate:
            moved.append(f"{out.flips['rate']:.1%} of answers changed correctness (limit {tol.max_flip_rate:.1%})")
        if tol.max_kl is not None and out.mean_kl is not None and out.mean_kl > tol.max_kl:
            moved.append(f"mean KL {out.mean_kl:.4f} (limit {tol.max_kl:g})")
        if moved:
            out.verdict, out.n_to_decide = FAIL, None  # decided: no number of items would change it
            out.reason = "; ".join(moved) + (f"; {out.reason}" if out.reason else "")
    elif base.se is not None and cand.se is not None and base.se == base.se and cand.se == cand.se:
        se = math.hypot(base.se, cand.se)
        out.interval = (point_gain - 1.96 * se, point_gain + 1.96 * se)
        out.method = "unpaired (the sides share no items)"
        out.verdict = _verdict(point_gain, *out.interval, t)
        out.reason = f"95% interval [{out.interval[0]:+.4f}, {out.interval[1]:+.4f}] against -{t:.4f}"
    else:
        out.method = "point estimates (no per-item records or errors)"
        out.verdict = PASS if point_gain >= -t - 1e-12 else FAIL
        out.reason = f"gain {point_gain:+.4f} " + ("within" if out.verdict == PASS else "beyond") + f" -{t:.4f}"
    out.trtllm = _trtllm_view(base, cand, out.n or cand.n or base.n)
    out.vllm = {"rtol": VLLM_RTOL, "verdict": PASS if bool(np.isclose(base.value, cand.value, rtol=VLLM_RTOL)) else FAIL}
    return out


def _trtllm_view(base: Metric, cand: Metric, n: int | None) -> dict[str, Any] | None:
    """TensorRT-LLM's accuracy test on the same numbers: threshold = reference + z_alpha *
    sqrt(2 sigma^2 / n) (one-sided, unpaired), minimum detectable effect theta = -(z_alpha +
    z_beta) * sqrt(2 sigma^2 / n). sigma is its stored 0.5 for 0/1 tasks, else the baseline
    items' standard deviation."""
    if base.kind == "lower_is_better" or not n:
        return None
    if base.kind == "accuracy":
        sigma = TRTLLM_SIGMA_01
    elif base.items:
        sigma = float(np.std([i.num / i.den for i in base.items.values()], ddof=1))
    else:
        return None
    scale = math.sqrt(2 * sigma ** 2 / n)
    z_a, z_b = NormalDist().inv_cdf(TRTLLM_ALPHA), NormalDist().inv_cdf(TRTLLM_BETA)
    threshold = base.value + z_a * scale
    return {"sigma": sigma, "n": n, "threshold": threshold, "theta": float(-(z_a + z_b) * scale),
            "verdict": PASS if cand.value >= threshold else FAIL}


def overall(verdicts: list[str]) -> str:
    if FAIL in verdicts:
        return FAIL
    if INCONCLUSIVE in verdicts or not verdicts:
        return INCONCLUSIVE
    return PASS


# ------------------------------------------------------------------------------------ sides

# The run-config keys that only choose which items run: the comparison pairs the items both sides
# hold. Every other key, the task's prompt file and the data are the setup both must share.
_SELECTION_KEYS = {"mmlu": {"formulations", "per_subject", "subjects", "seed"},  # the seed draws the subset
                   "perplexity": {"per_article", "articles"}, "mt-bench": {"questions", "categories"},
                   "lm-eval": {"tasks", "limit"}}


def run_setup(run: dict[str, Any]) -> dict[str, Any]:
    """What decides a run's scores besides the model and recipe: its task, the task options that
    are not item selection, the task file's hash and the data's hashes."""
    task = run.get("task", "")
    config = {k: v for k, v in (run.get("config") or {}).items() if k not in _SELECTION_KEYS.get(task, ())}
    if task == "lm-eval":  # options a run records only when given: their absence is a setting too
        config = {"chat": None, "gen_kwargs": None, **config}
    data = run.get("data") if isinstance(run.get("data"), dict) else {}
    setup = {"task": task, **config, "task_config_sha256": run.get("task_config_sha256"),
             **{f"data.{k}": v for k, v in data.items() if k.endswith("sha256")},
             "chat_template_kwargs": run.get("chat_template_kwargs")}  # how chat prompts were rendered
    metrics = run.get("metrics") or {}
    if task == "mt-bench" and isinstance(metrics.get("judge"), dict):  # ratings of one judge compare
        judge = metrics["judge"]
        setup.update({"mode": metrics.get("mode"), **{f"judge.{k}": judge.get(k) for k in (
            "model", "served", "recipe", "config_sha256") if k in judge}})
    return setup


def run_selection(run: dict[str, Any]) -> dict[str, Any]:
    """Which items a run ran: its config's item-selection keys (the rest is ``run_setup``)."""
    keys = _SELECTION_KEYS.get(run.get("task", ""), set())
    return {k: v for k, v in (run.get("config") or {}).items() if k in keys}


def check_same_setup(base: Metric, cand: Metric) -> None:
    """Two sides ran a task the same way, or a ValueError naming what differs (a 5-shot baseline
    against a 0-shot candidate would credit the recipe with the prompt's effect). A key only one
    side records (a run from an older version) is not held against it."""
    if not base.setup or not cand.setup:
        return
    differ = [f"{k} {base.setup[k]!r} vs {cand.setup[k]!r}" for k in sorted(set(base.setup) & set(cand.setup))
              if base.setup[k] != cand.setup[k]]
    if differ:
        raise ValueError(f"{base.name}: the baseline and the candidate ran the task differently ({'; '.join(differ)}); "
                         "a paired comparison needs runs with the same setup")


def side_from_run(run_dir: str | Path) -> Side:
    """A run folder as a side: its metrics with per-item records."""
    run_dir = Path(run_dir)
    try:
        run = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{run_dir}: not a run folder (no readable run.json: {e})") from None
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "samples.jsonl").is_file() else []
    latest = {}
    for r in samples:
        latest[_record_key(r)] = r
    records = [r for r in latest.values() if "failed" not in r]
    task = run.get("task", "")
    status = run.get("status")
    if not run.get("metrics"):
        raise ValueError(f"{run_dir}: the run has not finished (status {status!r}: stopped, or running now); "
                         "its command, run again, resumes it")
    if status != "complete":
        failed = len(latest) - len(records)
        log.warning("%s is %s (%d items failed): it is compared on the items it holds; its command, run again, "
                    "retries the rest", run_dir, status, failed)
    extract = _EXTRACTORS.get(task)
    if extract is None:
        raise ValueError(f"{run_dir}: task {task!r} has no metric extractor; known: {', '.join(sorted(_EXTRACTORS))}")
    recipe = (run.get("recipe") or {}).get("name", "?")
    label = _run_label(run, recipe)
    info = {"model": (run.get("model") or {}).get("name"), "task": task, "status": run.get("status"),
            "device": (run.get("backend") or {}).get("device"),
            "weight_bytes": (run.get("recipe") or {}).get("deployed_weight_bytes"),
            "device_name": (run.get("backend") or {}).get("device_name"),
            "kernel_path": (run.get("backend") or {}).get("kernel_path"), "versions": run.get("versions"),
            "config_hash": run.get("config_hash")}
    metrics = extract(run, records)
    for m in metrics.values():
        m.setup = run_setup(run)
    info[f"selection.{task}"] = run_selection(run)  # per task: a merged side keeps each of its runs'
    return Side(label, recipe, str(run_dir), metrics, info)


def _record_key(r: dict) -> tuple:
    return (r.get("kind"), r.get("formulation"), r.get("id"), r.get("question_id"), r.get("turn"), r.get("judge_key"))


def _run_label(run: dict, recipe: str) -> str:
    """The recipe, with the settings where the run's config differs from the recipe's defaults."""
    import dataclasses

    from .quant.api import get_recipe

    config = (run.get("recipe") or {}).get("config") or {}
    try:
        default = dataclasses.asdict(get_recipe(recipe).config)
    except KeyError:
        return recipe
    changed = {k: v for k, v in config.items() if k in default and default[k] != v and not isinstance(v, dict)}
    return recipe + ("[" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) + "]" if changed else "")


def _mmlu_metrics(run: dict, records: list[dict]) -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    sizes = _mmlu_subject_sizes(run)
    for form, m in (run.get("metrics") or {}).items():
        mine = [r for r in records if r.get("formulation") == form]
        per_subject: dict[str, int] = {}
        for r in mine:
            per_subject[r["subject"]] = per_subject.get(r["subject"], 0) + 1
        # each question weighs its subject's share of the full test set (the stratified estimate)
        w = {s: (sizes.get(s, n) / n) for s, n in per_subject.items()}
        for key, field_ in (("acc", "correct"), ("acc_norm", "correct_norm")):
            if key not in m:
                continue
            name = f"mmlu.{form}.{key}"
            items = {r["id"]: Item(w[r["subject"]] * float(r[field_]), w[r["subject"]], r["subject"],
                                   tuple(choice_distribution(r["logprobs"])) if "logprobs" in r else None)
                     for r in mine}
            o = m[key]["overall"]
            out[name] = Metric(name, "accuracy", o["acc"], o["se"], o["n"], items)
    return out


def _mmlu_subject_sizes(run: dict) -> dict[str, int]:
    """Subject sizes of the full test set the run drew from (for the stratified weights); empty
    when its data cannot be read here, and every question then weighs the same."""
    try:
        from .runners.mmlu import load_mmlu
        from .taskdef import load_task

        return load_mmlu(load_task("mmlu"), (run.get("config") or {}).get("data", "embedded")).subject_sizes()
    except Exception:  # noqa: BLE001  (a hub id offline, a moved file: equal weights are the fallback)
        return {}


def _perplexity_metrics(run: dict, records: list[dict]) -> dict[str, Metric]:
    m = run.get("metrics") or {}
    if "word_perplexity" not in m:
        return {}
    wp = m["word_perplexity"]
    items = {r["id"]: Item(-r["logprob"], r["words"], r["article"]) for r in records}
    return {"perplexity.word": Metric("perplexity.word", "lower_is_better", wp["value"], wp["log_se"],
                                      m["documents"], items)}


def _mtbench_metrics(run: dict, records: list[dict]) -> dict[str, Metric]:
    """The judge's single-grading score per (question, turn): parsed and probability-weighted
    apart, each a 1-10 score metric."""
    m = run.get("metrics") or {}
    out: dict[str, Metric] = {}
    for name, field_ in (("parsed", "score"), ("probability", "prob_score")):
        agg = m.get(name)
        if not agg or agg.get("score") is None:
            continue
        items = {f"{r['question_id']}-{r['turn']}": Item(float(r[field_]), 1.0, str(r["question_id"]))
                 for r in records if r.get("kind") == "judgment" and r.get(field_) is not None
                 and r.get("judge_key") == m.get("judge_key")}
        metric = "mt_bench" if name == "parsed" else "mt_bench.probability"
        out[metric] = Metric(metric, "score", agg["score"], agg["se"], agg["n"], items)
    return out


# lm-eval's per-sample value of a metric, by the metric's aggregation: "mean" of a number, a
# "perplexity" of per-sample log-likelihoods, a "weighted_perplexity" of [log-likelihood, words or
# bytes]. Each becomes an item (num, den) whose ratio over a task is the metric (its log for the
# perplexities); other aggregations (corpus BLEU, bits per byte, ...) are compared on lm-eval's
# value alone.
_LM_EVAL_DEFAULT_AGGREGATION = {"perplexity": "perplexity", "word_perplexity": "weighted_perplexity",
                                "byte_perplexity": "weighted_perplexity", "bits_per_byte": "bits_per_byte"}


def _lm_eval_metrics(run: dict, records: list[dict]) -> dict[str, Metric]:
    """lm-eval tasks run through the suite (``evalsuite run --harness lm-eval``): for every task
    asked for (a group whose results lm-eval aggregates: its subtasks' documents together; a group
    without them, or a tag: each of its tasks) and every metric and filter, lm-eval's own value,
    named ``lm-eval.TASK.METRIC`` (``,FILTER`` appended unless the filter is ``none``), with
    per-document items wherever they reproduce that value (a group weighs its subtasks by size or
    equally, as its config says)."""
    info = run.get("lm_eval") or {}
    results = run.get("metrics") or {}
    groups = info.get("group_subtasks") or {}
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r.get("task", ""), []).append(r)

    def leaves(task: str) -> list[str]:
        return [leaf for sub in groups[task] for leaf in leaves(sub)] if groups.get(task) else [task]

    def has_values(task: str) -> bool:
        return any("," in k and not k.endswith("_stderr") for k in (results.get(task) or {}))

    shown: list[str] = []  # the tasks asked for; a group without aggregate results: its subtasks
    tags = False
    for asked in (run.get("config") or {}).get("tasks", []):
        if has_values(asked):
            shown.append(asked)
        elif asked in groups:
            shown += [t for t in leaves(asked) if has_values(t)]
        else:  # a tag: lm-eval reports its tasks one by one and names no members
            tags = True
    if tags:
        covered = {leaf for t in shown for leaf in leaves(t)}
        shown += [t for t in results if has_values(t) and t not in groups and t not in covered]
    out: dict[str, Metric] = {}
    for task in shown:
        for key, value in results[task].items():
            metric, _, filter_ = key.partition(",")
            if not filter_ or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            name = f"lm-eval.{task}.{metric}" + ("" if filter_ == "none" else f",{filter_}")
            stderr = results[task].get(f"{metric}_stderr,{filter_}")
            m = _lm_eval_metric(name, metric, filter_, float(value), stderr,
                                {leaf: by_task.get(leaf, []) for leaf in leaves(task)}, info)
            if m is not None:
                out[name] = m
    return out


def _lm_eval_metric(name: str, metric: str, filter_: str, value: float, stderr: Any,
                    docs: dict[str, list[dict]], info: dict) -> Metric | None:
    first = next(iter(docs))
    spec = next((d for d in ((info.get("configs") or {}).get(first) or {}).get("metric_list") or []
                 if d.get("metric") == metric), {})
    aggregation = spec.get("aggregation") if isinstance(spec.get("aggregation"), str) else \
        _LM_EVAL_DEFAULT_AGGREGATION.get(metric, "mean")
    higher = ((info.get("higher_is_better") or {}).get(first) or {}).get(metric, spec.get("higher_is_better"))
    if higher is None:
        higher = aggregation == "mean"
    kind = "lower_is_better" if not higher else "accuracy"
    if (aggregation == "mean") != bool(higher) or aggregation not in ("mean", "perplexity", "weighted_perplexity"):
        return None  # lower-is-better means, corpus-level metrics: no paired form here
    per_leaf: dict[str, dict[str, Item]] = {}
    try:
        for leaf, rows in docs.items():
            items = {}
            for r in rows:
                v = r.get(metric)
                if r.get("filter", "none") != filter_ or v is None:
                    continue
                if aggregation == "mean":
                    items[f"{leaf}/{r['doc_id']}"] = Item(float(v))
                elif aggregation == "perplexity":
                    items[f"{leaf}/{r['doc_id']}"] = Item(-float(v))
                else:
                    items[f"{leaf}/{r['doc_id']}"] = Item(-float(v[0]), float(v[1]))
            if items:
                per_leaf[leaf] = items
    except (TypeError, ValueError, IndexError, KeyError):  # a per-document value of another shape
        per_leaf = {}
    if kind == "accuracy" and any(i.num not in (0.0, 1.0) for items in per_leaf.values() for i in items.values()):
        kind = "score"
    se = float(stderr) if isinstance(stderr, (int, float)) and kind != "lower_is_better" else None
    return Metric(name, kind, value, se, sum(map(len, per_leaf.values())) or None,
                  _lm_eval_items(per_leaf, value, kind))


def _lm_eval_items(per_leaf: dict[str, dict[str, Item]], value: float, kind: str) -> dict[str, Item] | None:
    """The documents as items, weighted so that their ratio is lm-eval's value: every document
    alike (one task, or a group weighed by size), else every subtask alike. None when neither
    reproduces it (documents missing, another aggregation): the value is then compared alone."""
    def target(items: list[Item]) -> float:
        r = sum(i.num for i in items) / sum(i.den for i in items)
        return math.exp(r) if kind == "lower_is_better" else r

    several = len(per_leaf) > 1
    plain = {k: Item(i.num, i.den, leaf if several else k)
             for leaf, items in per_leaf.items() for k, i in items.items()}
    if plain and math.isclose(target(list(plain.values())), value, rel_tol=1e-9, abs_tol=1e-12):
        return plain
    equal = {}
    for leaf, items in per_leaf.items():
        w = 1.0 / sum(i.den for i in items.values())
        equal.update({k: Item(w * i.num, w * i.den, leaf) for k, i in items.items()})
    if several and math.isclose(target(list(equal.values())), value, rel_tol=1e-9, abs_tol=1e-12):
        return equal
    return None


_EXTRACTORS = {"mmlu": _mmlu_metrics, "perplexity": _perplexity_metrics, "mt-bench": _mtbench_metrics,
               "lm-eval": _lm_eval_metrics}


def register_extractor(task: str, extract) -> None:
    """A runner whose records a comparison should read: ``extract(run, records) -> {name: Metric}``."""
    _EXTRACTORS[task] = extract


def merge_sides(sides: list[Side]) -> list[Side]:
    """Runs of one model and recipe on different tasks (an MMLU run and a perplexity run) become
    one side holding all their metrics; two runs with a metric in common stay apart, told apart
    by their folder names."""
    merged: list[Side] = []
    for side in sides:
        key = (side.label, side.info.get("model"))
        home = next((m for m in merged if (m.label, m.info.get("model")) == key
                     and not set(m.metrics) & set(side.metrics) and not m.source.startswith("ref:")), None)
        if home is None or side.source.startswith("ref:"):
            merged.append(Side(side.label, side.recipe, side.source, dict(side.metrics), dict(side.info)))
            continue
        home.metrics.update(side.metrics)
        home.source = f"{home.source} + {side.source}"
        for k, v in side.info.items():
            home.info.setdefault(k, v)
            if home.info[k] is None:
                home.info[k] = v
    labels = [s.label for s in merged]
    for s in merged:
        if labels.count(s.label) > 1:
            s.label = f"{s.label}@{Path(s.source.split(' + ')[0]).name}"
    return merged


# ------------------------------------------------------------------------------------ reports

@dataclass
class CandidateResult:
    candidate: Side
    comparisons: list[Comparison]

    @property
    def verdict(self) -> str:
        return overall([c.verdict for c in self.comparisons])


def compare_sides(baseline: Side, candidates: list[Side], tolerances: dict[str, Tolerance],
                  default: Tolerance | None = None) -> list[CandidateResult]:
    """Every metric both sides hold, at its tolerance (``tolerances`` by metric name; a family
    prefix such as ``mmlu`` applies to ``mmlu.letter`` too; else ``default``)."""
    out = []
    for cand in candidates:
        rows = []
        for name in sorted(set(baseline.metrics) & set(cand.metrics)):
            tol = _tolerance_for(name, tolerances, default)
            if tol is None:
                continue
            rows.append(compare_metric(baseline.metrics[name], cand.metrics[name], tol))
        out.append(CandidateResult(cand, rows))
    return out


def _tolerance_for(name: str, tolerances: dict[str, Tolerance], default: Tolerance | None) -> Tolerance | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in tolerances:
            return tolerances[key]
    return default


def format_table(baseline: Side, results: list[CandidateResult]) -> str:
    lines = [f"baseline: {baseline.label} ({baseline.source})"]
    width = max([22] + [len(c.metric) for r in results for c in r.comparisons])  # lm-eval's names run long
    header = (f"{'candidate':<26} {'metric':<{width}} {'base':>8} {'cand':>8} {'gain':>8} {'95% interval':>20} "
              f"{'tol':>10} {'verdict':<13} {'flips r>w/w>r':>13} {'McNemar p':>9} {'KL':>8} "
              f"{'TRT-LLM':>8} {'vLLM':>5}")
    lines += [header, "-" * len(header)]
    for res in results:
        for c in res.comparisons:
            ivl = f"[{c.interval[0]:+.4f}, {c.interval[1]:+.4f}]" if c.interval else "-"
            flips = f"{c.flips['right_to_wrong']}/{c.flips['wrong_to_right']}" if c.flips else "-"
            p = f"{c.flips['mcnemar_p']:.3f}" if c.flips else "-"
            kl = f"{c.mean_kl:.4f}" if c.mean_kl is not None else "-"
            trt = c.trtllm["verdict"] if c.trtllm else "n/a"
            lines.append(f"{res.candidate.label[:26]:<26} {c.metric:<{width}} {c.baseline:>8.4f} {c.candidate:>8.4f} "
                         f"{c.gain:>+8.4f} {ivl:>20} {c.tolerance[:10]:>10} {c.verdict:<13} {flips:>13} {p:>9} "
                         f"{kl:>8} {trt:>8} {c.vllm['verdict']:>5}")
        lines.append(f"{'':<26} => {res.candidate.label}: {res.verdict}")
    explain = [(r.candidate.label, c) for r in results for c in r.comparisons if c.verdict != PASS]
    if explain:
        lines.append("")
        for label, c in explain:
            more = f"; about {c.n_to_decide} paired items would decide it at this variance" if c.n_to_decide else ""
            lines.append(f"{c.verdict}: {label} {c.metric}: {c.reason} ({c.method}){more}")
    notes = [(r.candidate.label, c) for r in results for c in r.comparisons if c.trtllm]
    if notes:
        lines.append("")
        lines.append("TRT-LLM column: TensorRT-LLM's unpaired accuracy test on the same n (alpha 0.05, beta 0.2); "
                     "it detects only drops larger than theta:")
        for label, c in notes:
            lines.append(f"  {label} {c.metric}: n={c.trtllm['n']}, threshold {c.trtllm['threshold']:.4f}, "
                         f"theta {c.trtllm['theta']:.4f} (paired interval width "
                         + (f"{c.interval[1] - c.interval[0]:.4f})" if c.interval else "n/a)"))
    return "\n".join(lines)


def results_json(baseline: Side, results: list[CandidateResult], extra: dict[str, Any] | None = None) -> dict:
    return {"baseline": {"label": baseline.label, "recipe": baseline.recipe, "source": baseline.source,
                         "info": baseline.info},
            "candidates": [{"label": r.candidate.label, "recipe": r.candidate.recipe, "source": r.candidate.source,
                            "info": r.candidate.info, "verdict": r.verdict,
                            "metrics": [c.to_dict() for c in r.comparisons]} for r in results],
            "verdict": overall([r.verdict for r in results]), **(extra or {})}
