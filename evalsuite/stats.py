"""Accuracy estimates with standard errors.

A subject's accuracy is the mean of its 0/1 outcomes with the sample standard error
sqrt(p(1-p)/(n-1)) (lm-eval's ``mean_stderr``). A group (a category, or all of MMLU) is the
stratified estimate: subject accuracies weighted by each subject's size in the full test set,
SE = sqrt(sum w_s^2 SE_s^2). On the full test set this is exactly the question-weighted (micro)
accuracy that lm-eval reports; on a stratified subset it estimates that same number instead of
the equal-subject average the subset's raw mean would give.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    acc: float
    se: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"acc": self.acc, "se": self.se, "n": self.n}


def mean_estimate(outcomes: Iterable[bool | int | float]) -> Estimate:
    xs = [float(x) for x in outcomes]
    n = len(xs)
    if n == 0:
        raise ValueError("no outcomes to average")
    p = sum(xs) / n
    if n == 1:
        return Estimate(p, float("nan"), 1)
    var = sum((x - p) ** 2 for x in xs) / (n - 1)
    return Estimate(p, math.sqrt(var / n), n)


def stratified_estimate(strata: Mapping[str, Estimate], weights: Mapping[str, float]) -> Estimate:
    """Weighted combination of per-stratum estimates; weights are normalised over the strata given."""
    total = sum(weights[s] for s in strata)
    if total <= 0:
        raise ValueError("stratum weights sum to zero")
    acc = sum(weights[s] * e.acc for s, e in strata.items()) / total
    # A stratum with a single outcome has no variance estimate, and neither has the total.
    var = sum((weights[s] / total) ** 2 * e.se ** 2 for s, e in strata.items())
    return Estimate(acc, math.sqrt(var), sum(e.n for e in strata.values()))


def accuracy_table(outcomes: Mapping[str, list[bool]], categories: Mapping[str, str],
                   subject_sizes: Mapping[str, int]) -> dict:
    """Overall, per-category and per-subject estimates from 0/1 outcomes grouped by subject."""
    subjects = {s: mean_estimate(v) for s, v in sorted(outcomes.items()) if v}
    by_cat: dict[str, dict[str, Estimate]] = {}
    for s, e in subjects.items():
        by_cat.setdefault(categories[s], {})[s] = e
    return {
        "overall": stratified_estimate(subjects, subject_sizes).to_dict(),
        "categories": {c: stratified_estimate(v, subject_sizes).to_dict() for c, v in sorted(by_cat.items())},
        "subjects": {s: e.to_dict() for s, e in subjects.items()},
    }


def paired_accuracy_difference(base: Mapping[str, dict], cand: Mapping[str, dict],
                               weights: Mapping[str, float] | None = None) -> Estimate:
    """Candidate minus baseline accuracy over the questions both record sets hold, from the
    per-question differences d = correct_cand - correct_base: their mean with the paired standard
    error sd(d) / sqrt(n) (a paired t-test's denominator). With subject ``weights`` the differences
    are stratified by each record's "subject" exactly as accuracies are (``accuracy_table``), so
    the difference is the difference of the two reported accuracies."""
    ids = sorted(set(base) & set(cand))
    if not ids:
        raise ValueError("the two record sets share no question")
    diffs: dict[str, list[int]] = {}
    for i in ids:
        key = base[i]["subject"] if weights is not None else ""
        diffs.setdefault(key, []).append(int(cand[i]["correct"]) - int(base[i]["correct"]))
    if weights is None:
        return mean_estimate(diffs[""])
    return stratified_estimate({s: mean_estimate(d) for s, d in diffs.items()}, weights)


def choice_distribution(logprobs: list[float]) -> list[float]:
    """The model's distribution over the answer choices: softmax of their log-likelihoods."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def kl_divergence(p: list[float], q: list[float]) -> float:
    """KL(p || q) in nats; terms with p = 0 contribute nothing."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def paired_changes(base: Mapping[str, dict], cand: Mapping[str, dict]) -> dict[str, float | int]:
    """Over the questions both record sets hold: how many predictions differ, and the mean KL of the
    candidate's choice distribution from the baseline's (log-likelihood records only)."""
    ids = sorted(set(base) & set(cand))
    if not ids:
        raise ValueError("the two record sets share no question")
    flips = sum(base[i]["prediction"] != cand[i]["prediction"] for i in ids)
    out: dict[str, float | int] = {"n": len(ids), "changed": flips, "changed_share": flips / len(ids)}
    if "logprobs" in base[ids[0]]:
        kls = [kl_divergence(choice_distribution(base[i]["logprobs"]), choice_distribution(cand[i]["logprobs"]))
               for i in ids]
        out["mean_kl"] = sum(kls) / len(kls)
    return out


def ratio_estimate(numerators: Sequence[float], denominators: Sequence[float],
                   clusters: Sequence[Hashable] | None = None) -> Estimate:
    """R = sum(y) / sum(x) (e.g. negative log-likelihood per word over documents) with its
    linearised (delta-method) standard error, clustered when ``clusters`` groups the items:
    SE = sqrt(G / (G - 1) * sum_g (sum_{i in g} (y_i - R x_i))^2) / sum(x), G groups (each item
    its own group when ``clusters`` is None). ``n`` is the number of items."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError("ratio_estimate needs as many numerators as denominators, at least one")
    total = sum(denominators)
    if total <= 0:
        raise ValueError("the denominators sum to zero")
    r = sum(numerators) / total
    groups: dict[Hashable, float] = {}
    for i, (y, x) in enumerate(zip(numerators, denominators)):
        key = clusters[i] if clusters is not None else i
        groups[key] = groups.get(key, 0.0) + (y - r * x)
    g = len(groups)
    if g < 2:
        return Estimate(r, float("nan"), len(numerators))
    var = g / (g - 1) * sum(v * v for v in groups.values())
    return Estimate(r, math.sqrt(var) / total, len(numerators))
