from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from evalsuite.stats import Estimate, accuracy_table, mean_estimate, stratified_estimate


def test_mean_estimate_matches_scipy_sem():
    xs = [1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 1]
    e = mean_estimate(xs)
    assert e.acc == pytest.approx(6 / 11)
    assert e.se == pytest.approx(sps.sem(xs))


def test_stratified_equals_micro_mean_on_full_strata():
    a, b = [1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]
    table = accuracy_table({"s1": [bool(x) for x in a], "s2": [bool(x) for x in b]},
                           {"s1": "stem", "s2": "other"}, {"s1": 4, "s2": 8})
    assert table["overall"]["acc"] == pytest.approx(3 / 12)
    # hand-computed: w = (1/3, 2/3); se^2 = (1/9) sem(a)^2 + (4/9) sem(b)^2
    want = math.sqrt(sps.sem(a) ** 2 / 9 + 4 * sps.sem(b) ** 2 / 9)
    assert table["overall"]["se"] == pytest.approx(want)
    assert table["categories"]["stem"]["acc"] == pytest.approx(0.5)


def test_subset_is_reweighted_by_full_subject_size():
    # two questions per subject, but s2 is 9x larger in the full test set
    est = stratified_estimate({"s1": Estimate(1.0, 0.0, 2), "s2": Estimate(0.0, 0.0, 2)}, {"s1": 10, "s2": 90})
    assert est.acc == pytest.approx(0.1)


def test_single_question_strata_have_no_se():
    est = stratified_estimate({"s1": mean_estimate([1]), "s2": mean_estimate([0, 1])}, {"s1": 1, "s2": 1})
    assert math.isnan(est.se)


def test_choice_kl_matches_scipy_entropy():
    from evalsuite.stats import choice_distribution, kl_divergence

    a, b = [-1.0, -2.0, -0.5, -3.0], [-1.2, -1.9, -0.7, -2.5]
    p, q = choice_distribution(a), choice_distribution(b)
    assert sum(p) == pytest.approx(1.0)
    assert kl_divergence(p, q) == pytest.approx(sps.entropy(p, q))
    assert kl_divergence(p, p) == 0.0


def test_paired_changes():
    from evalsuite.stats import paired_changes

    base = {"a": {"prediction": 0, "logprobs": [-1, -2, -3, -4]}, "b": {"prediction": 1, "logprobs": [-2, -1, -3, -4]},
            "only-base": {"prediction": 0, "logprobs": [0, -1, -1, -1]}}
    cand = {"a": {"prediction": 0, "logprobs": [-1, -2, -3, -4]}, "b": {"prediction": 0, "logprobs": [-1, -2, -3, -4]}}
    out = paired_changes(base, cand)
    assert out["n"] == 2 and out["changed"] == 1 and out["changed_share"] == 0.5
    p = [math.exp(x) for x in (-2, -1, -3, -4)]
    q = [math.exp(x) for x in (-1, -2, -3, -4)]
    assert out["mean_kl"] == pytest.approx(sps.entropy(p, q) / 2)


def test_paired_accuracy_difference_matches_scipy_ttest_rel():
    from evalsuite.stats import paired_accuracy_difference

    base_ok = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    cand_ok = [1, 1, 0, 1, 0, 1, 1, 1, 1, 0]
    subjects = ["x"] * 6 + ["y"] * 4
    base = {str(i): {"subject": s, "correct": bool(c)} for i, (s, c) in enumerate(zip(subjects, base_ok))}
    cand = {str(i): {"subject": s, "correct": bool(c)} for i, (s, c) in enumerate(zip(subjects, cand_ok))}
    cand["extra"] = {"subject": "x", "correct": True}  # only in one set: ignored
    plain = paired_accuracy_difference(base, cand)
    assert plain.acc == pytest.approx(0.1) and plain.n == 10  # 7/10 - 6/10
    assert plain.se == pytest.approx(0.1 / sps.ttest_rel(cand_ok, base_ok).statistic)
    # stratified by subject with weights 1 (x) and 3 (y): x's d = [0, 1, -1, 0, 0, 1] (+1/6),
    # y's d = [0, 1, 0, -1] (mean 0, sample variance 2/3, so SE sqrt(2/3 / 4))
    strat = paired_accuracy_difference(base, cand, {"x": 1, "y": 3})
    assert strat.acc == pytest.approx(0.25 / 6)
    se_x = (1 / 6) / sps.ttest_rel(cand_ok[:6], base_ok[:6]).statistic
    se_y = math.sqrt(2 / 3 / 4)
    assert strat.se == pytest.approx(math.sqrt((0.25 * se_x) ** 2 + (0.75 * se_y) ** 2))
