"""The comparator's statistics against scipy, its verdicts, the published note's comparison, the
gate's exit codes and JUnit output, and the run index under crashes and concurrent writers."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from evalsuite import cli
from evalsuite.compare import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    Item,
    Metric,
    Tolerance,
    cluster_bootstrap,
    compare_metric,
    mcnemar_exact,
    side_from_run,
)
from evalsuite.references import load_reference, speedup_check
from evalsuite.runindex import RunIndex


@pytest.mark.parametrize("b, c", [(0, 0), (3, 0), (5, 9), (12, 12), (40, 17), (1, 30)])
def test_mcnemar_exact_equals_scipys_binomial_test(b, c):
    want = 1.0 if b + c == 0 else sps.binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(want, rel=1e-12)


def _metric(values, kind="accuracy", clusters=None, name="m") -> Metric:
    items = {str(i): Item(float(v), 1.0, clusters[i] if clusters else str(i)) for i, v in enumerate(values)}
    return Metric(name, kind, float(np.mean(values)), None, len(values), items)


def test_paired_interval_equals_scipys_paired_t_interval():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, 300)
    cand = np.where(rng.random(300) < 0.12, 1 - base, base)  # 12% of answers flip
    cmp = compare_metric(_metric(base), _metric(cand), Tolerance(0.05))
    ci = sps.ttest_rel(cand, base).confidence_interval(0.95)
    assert cmp.gain == pytest.approx(cand.mean() - base.mean())
    assert cmp.interval == pytest.approx((ci.low, ci.high), abs=1e-12)
    rw = int(((base == 1) & (cand == 0)).sum())
    wr = int(((base == 0) & (cand == 1)).sum())
    assert (cmp.flips["right_to_wrong"], cmp.flips["wrong_to_right"]) == (rw, wr)
    assert cmp.flips["mcnemar_p"] == pytest.approx(sps.binomtest(rw, rw + wr, 0.5).pvalue)
    # the seeded bootstrap is reproducible and agrees with the t interval to within its noise
    again = compare_metric(_metric(base), _metric(cand), Tolerance(0.05))
    assert again.bootstrap == cmp.bootstrap
    assert cmp.bootstrap == pytest.approx(cmp.interval, abs=0.01)


def test_clustered_interval_is_wider_when_clusters_move_together():
    rng = np.random.default_rng(2)
    clusters = [f"s{i // 10}" for i in range(400)]
    shift = {c: rng.normal(0, 0.25) for c in set(clusters)}  # whole subjects move together
    base = rng.integers(0, 2, 400)
    # a subject either loses answers (right -> wrong) or gains them, with its own rate
    cand = np.array([(0 if shift[c] > 0 else 1) if rng.random() < abs(shift[c]) else b
                     for b, c in zip(base, clusters)])
    flat = compare_metric(_metric(base), _metric(cand), Tolerance(0.05))
    clus = compare_metric(_metric(base, clusters=clusters), _metric(cand, clusters=clusters), Tolerance(0.05))
    assert clus.gain == pytest.approx(flat.gain)
    assert clus.clusters == 40 and "clustered by 40" in clus.method
    assert clus.interval[1] - clus.interval[0] > flat.interval[1] - flat.interval[0]
    lo, hi = cluster_bootstrap(np.array(cand - base, float), np.ones(400), clusters)
    assert (lo, hi) == pytest.approx(clus.interval, abs=0.02)


def test_same_effect_is_inconclusive_on_few_questions_and_passes_on_many():
    """A candidate 1 point below its baseline, 3% of answers changed, tolerance 3 points."""
    def pair(n):
        base = np.array([1, 0] * (n // 2))
        cand = base.copy()
        k = int(0.03 * n)
        down = np.flatnonzero(base == 1)[: k // 2 + int(0.005 * n)]
        up = np.flatnonzero(base == 0)[: k // 2 - int(0.005 * n)]
        cand[down], cand[up] = 0, 1
        return base, cand

    small = compare_metric(*map(_metric, pair(200)), Tolerance(0.03))
    large = compare_metric(*map(_metric, pair(20000)), Tolerance(0.03))
    assert small.gain == pytest.approx(large.gain, abs=1e-9) and small.gain == pytest.approx(-0.01)
    assert small.verdict == INCONCLUSIVE and small.n_to_decide > 200
    assert large.verdict == PASS
    assert small.n_to_decide <= 20000


def test_lower_is_better_is_compared_on_the_log_scale():
    # perplexity: num = NLL of a document, den = its words; the candidate is 10% worse everywhere
    base = {str(i): Item(2.0 * (50 + i), 50 + i, f"a{i % 5}") for i in range(40)}
    cand = {k: Item(v.num + math.log(1.1) * v.den, v.den, v.cluster) for k, v in base.items()}
    b = Metric("perplexity.word", "lower_is_better", math.exp(2.0), None, 40, base)
    c = Metric("perplexity.word", "lower_is_better", math.exp(2.0) * 1.1, None, 40, cand)
    assert compare_metric(b, c, Tolerance(0.05, relative=True)).verdict == FAIL
    assert compare_metric(b, c, Tolerance(0.15, relative=True)).verdict == PASS
    assert compare_metric(b, c, Tolerance(0.15, True)).gain == pytest.approx(-math.log(1.1))


def test_trtllm_and_vllm_views_on_the_same_numbers():
    """TensorRT-LLM's threshold = ref + Phi^-1(0.05) sqrt(2 * 0.5^2 / n) (its README's formula);
    vLLM's check is np.isclose(ref, measured, rtol=0.08)."""
    base = np.array([1] * 600 + [0] * 400)
    cand = base.copy()
    cand[:30] = 0  # 3 points lower
    cmp = compare_metric(_metric(base), _metric(cand), Tolerance(0.01))
    scale = math.sqrt(2 * 0.25 / 1000)
    assert cmp.trtllm["threshold"] == pytest.approx(0.6 + sps.norm.ppf(0.05) * scale)
    assert cmp.trtllm["theta"] == pytest.approx((sps.norm.ppf(0.95) + sps.norm.ppf(0.8)) * scale)
    # 0.57 is above 0.6 - 1.645 * 0.0224 = 0.563: the unpaired test misses the 3-point drop
    assert cmp.trtllm["verdict"] == PASS
    assert cmp.vllm["verdict"] == PASS  # 0.57 is within 8% of 0.60
    assert cmp.verdict == FAIL  # the paired test sees 30 answers lost and none gained


def test_the_notes_comparison_renders_and_passes(capsys):
    rows = speedup_check(load_reference("llama-3.1-405b-h200"))
    assert [round(r["speedup"], 2) for r in rows] == [1.16, 1.39, 1.44, 1.33, 1.34, 1.19]
    assert all(r["consistent"] for r in rows)  # 44.2/33.1 prints 1.34, the note 1.33: inside the rounding
    rc = cli.main(["compare", "ref:llama-3.1-405b-h200", "--json", "-"])
    out = capsys.readouterr().out
    assert rc == 0
    blob = json.loads(out[out.index("{\n"):])
    assert blob["baseline"]["recipe"] == "fp8-official" and blob["verdict"] == PASS
    got = {(c["recipe"], m["metric"]): (m["gain"], m["tolerance"], m["verdict"])
           for c in blob["candidates"] for m in c["metrics"]}
    assert got[("fp8-modelopt", "mt_bench")] == (pytest.approx(0.04), "0.1", PASS)
    assert got[("int4-awq", "mt_bench")] == (pytest.approx(-0.02), "0.1", PASS)
    assert got[("int4-awq", "mmlu")] == (0.0, "0.01", PASS)
    assert "1.44x  matches" in out and "MISMATCH" not in out


# ---------------------------------------------------------------------------------- gate

SUBJECTS = ["anatomy", "astronomy", "virology", "marketing", "philosophy", "sociology", "prehistory", "nutrition"]


def write_run(folder: Path, recipe: str, correct: list[int], form: str = "cloze") -> Path:
    """A run folder as `evalsuite run mmlu` writes it, with chosen outcomes."""
    folder.mkdir(parents=True)
    recs = [{"id": f"{SUBJECTS[i % 8]}-{i}", "subject": SUBJECTS[i % 8], "formulation": form, "correct": bool(c),
             "correct_norm": bool(c), "prediction": 0 if c else 1, "target": 0, "logprobs": [-1.0, -1.5, -2.0, -2.5]}
            for i, c in enumerate(correct)]
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    acc = float(np.mean(correct))
    run = {"task": "mmlu", "status": "complete", "config": {"data": "embedded"},
           "recipe": {"name": recipe, "config": {}}, "model": {"name": "tiny"},
           "metrics": {form: {"n": len(recs), "acc": {"overall": {"acc": acc, "se": 0.01, "n": len(recs)}}}}}
    (folder / "run.json").write_text(json.dumps(run))
    return folder


def write_gate(path: Path, base: Path, cand: Path, tol: float = 0.05, metric: str = "mmlu.cloze.acc") -> Path:
    path.write_text(f"name: t\nbaseline: {{run: {base}}}\ncandidates:\n  - {{run: {cand}}}\n"
                    f"metrics:\n  {metric}: {{absolute: {tol}}}\n")
    return path


@pytest.mark.parametrize("case, want", [("pass", 0), ("fail", 1), ("inconclusive", 2)])
def test_gate_exit_codes(tmp_path, case, want, capsys):
    rng = np.random.default_rng(3)
    n = {"pass": 4000, "fail": 4000, "inconclusive": 80}[case]
    base = rng.integers(0, 2, n)
    cand = base.copy()
    if case == "fail":
        cand[np.flatnonzero(base == 1)[: n // 10]] = 0  # 10 points lost
    if case == "inconclusive":
        cand[np.flatnonzero(base == 1)[:2]] = 0
    b = write_run(tmp_path / "base", "fp8-official", list(base))
    c = write_run(tmp_path / "cand", "fp8-modelopt", list(cand))
    junit = tmp_path / "gate.xml"
    rc = cli.main(["gate", str(write_gate(tmp_path / "gate.yaml", b, c)), "--junit", str(junit)])
    out = capsys.readouterr().out
    assert rc == want
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "1"
    failure = suite.find("testcase/failure")
    if case == "pass":
        assert failure is None and "gate t: PASS (exit 0)" in out
    else:
        assert failure.get("type") == case.upper()
        assert f"{case.upper()}: fp8-modelopt mmlu.cloze.acc: 95% interval of the gain" in out


def test_gate_errors_exit_3(tmp_path, capsys):
    b = write_run(tmp_path / "base", "fp8-official", [1, 0] * 20)
    c = write_run(tmp_path / "cand", "fp8-modelopt", [1, 0] * 20, form="letter")
    assert cli.main(["gate", str(write_gate(tmp_path / "g.yaml", b, c))]) == 3  # metric only on one side
    assert "not on both sides" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("baseline: {recipe: bf16}\ncandidates: []\nmetrics: {mmlu: 0.01}\n")
    assert cli.main(["gate", str(tmp_path / "bad.yaml")]) == 3
    assert "candidates must be a non-empty list" in capsys.readouterr().err
    (tmp_path / "tol.yaml").write_text(f"baseline: {{run: {b}}}\ncandidates: [{{run: {b}}}]\nmetrics: {{mmlu: {{abs: 1}}}}\n")
    assert cli.main(["gate", str(tmp_path / "tol.yaml")]) == 3
    assert "valid: a number >= 0, {absolute: X} or {relative: X}" in capsys.readouterr().err
    assert cli.main(["gate", str(tmp_path / "missing.yaml")]) == 3


def test_a_gated_metric_that_names_nothing_is_an_error_not_a_pass(tmp_path, capsys):
    """A misspelt metric beside a correct one would otherwise gate nothing and pass."""
    b = write_run(tmp_path / "base", "fp8-official", [1, 0] * 20)
    c = write_run(tmp_path / "cand", "fp8-modelopt", [1, 0] * 20)
    gate = write_gate(tmp_path / "g.yaml", b, c)
    gate.write_text(gate.read_text() + "  perplexty: {relative: 0.05}\n")
    assert cli.main(["gate", str(gate)]) == 3
    err = capsys.readouterr().err
    assert "gated metrics ['perplexty'] name no metric of the runs" in err and "mmlu.cloze.acc" in err


@pytest.mark.parametrize("extra, msg", [
    (["--tolerance", "mmlu.clozee=0.02"], "no compared metric is named 'mmlu.clozee'; valid: mmlu, mmlu.cloze, "
                                          "mmlu.cloze.acc"),
    (["--tolerance", "mmlu=-0.01"], "--tolerance 'mmlu=-0.01': valid: a tolerance >= 0"),
    (["--tolerance", "mmlu=nan"], "--tolerance 'mmlu=nan': valid: a tolerance >= 0"),
    (["BASE"], "given more than once; give each run once"),
    (["--tolerance", "mmlu=0.01", "--tolerance", "mmlu=0.02"],
     "--tolerance mmlu is given twice (mmlu=0.01 and mmlu=0.02); valid: each metric once"),
])
def test_compare_refuses_a_tolerance_or_side_that_decides_nothing(tmp_path, capsys, extra, msg):
    b = write_run(tmp_path / "base", "fp8-official", [1, 0] * 20)
    c = write_run(tmp_path / "cand", "fp8-modelopt", [1, 0] * 20)
    argv = ["compare", str(b), str(c), *[str(b) if e == "BASE" else e for e in extra]]
    for command, code in ((argv, 3), (["report", "r", *argv[1:], "--root", str(tmp_path)], 2)):
        assert cli.main(command) == code  # compare's 2 is INCONCLUSIVE: its errors are 3
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_unfinished_runs_are_named_and_incomplete_ones_compared_with_a_warning(tmp_path, capsys, caplog):
    b = write_run(tmp_path / "base", "fp8-official", [1, 0] * 20)
    c = write_run(tmp_path / "cand", "fp8-modelopt", [1, 0] * 20)
    run = json.loads((c / "run.json").read_text())
    (c / "run.json").write_text(json.dumps({**run, "status": "running", "metrics": None}))  # killed mid-run
    assert cli.main(["compare", str(b), str(c)]) == 3
    assert f"{c}: the run has not finished (status 'running'" in capsys.readouterr().err
    (c / "run.json").write_text(json.dumps({**run, "status": "incomplete"}))  # some requests failed
    assert cli.main(["compare", str(b), str(c)]) == 0
    assert f"{c} is incomplete" in caplog.text and "compared on the items it holds" in caplog.text


def test_compare_needs_a_metric_in_common(tmp_path, capsys):
    b = write_run(tmp_path / "base", "fp8-official", [1, 0] * 20)
    c = write_run(tmp_path / "cand", "fp8-modelopt", [1, 0] * 20, form="letter")  # cloze against letter
    assert cli.main(["compare", str(b), str(c)]) == 3
    assert "fp8-modelopt (" in (err := capsys.readouterr().err) and "has no metric in common with the baseline" in err


def test_gate_names_a_run_folder_of_another_configuration(tmp_path, capsys):
    """A gate resumes its runs; a folder holding a run of other settings is refused, and the
    gate says which folder to delete rather than to rerun."""
    c = write_run(tmp_path / "cand", "fp8-modelopt", [1, 0] * 20)
    stale = tmp_path / "runs" / "bf16-mmlu"
    stale.mkdir(parents=True)
    (stale / "run.json").write_text(json.dumps({"config_hash": "of-an-older-version", "status": "complete"}))
    (tmp_path / "g.yaml").write_text(f"name: t\ntasks: {{mmlu: [--per-subject, '1']}}\nruns_dir: {tmp_path / 'runs'}\n"
                                     f"baseline: {{recipe: bf16}}\ncandidates: [{{run: {c}}}]\n"
                                     "metrics: {mmlu.cloze.acc: 0.1}\n")
    assert cli.main(["gate", str(tmp_path / "g.yaml")]) == 3
    err = capsys.readouterr().err
    assert "holds a run with a different configuration" in err
    assert "was refused (evalsuite run exited 2; the reason is above)" in err
    assert f"If the reason is that {stale} holds a run of another configuration" in err
    assert "delete that folder to run it anew" in err and "rerun the gate to resume it" not in err


@pytest.mark.parametrize("side, msg", [
    ("{recipe: int4-awq, recipe_config: {kernl: 'off'}}",
     "candidates[1]: recipe 'int4-awq' has no settings ['kernl']; valid: block_size"),
    ("{recipe: int4-awk}", "candidates[1]: unknown recipe 'int4-awk'"),
    ("{recipe: fp8-modelopt, recipe_config: {kv_scale_mode: x}}", "candidates[1]: "),
    ("{recipe: int4-awq, recipe_config: [kernel]}", "candidates[1].recipe_config = ['kernel']; valid: a mapping"),
])
def test_gate_checks_every_side_before_its_first_run(tmp_path, capsys, side, msg):
    """A bad recipe or setting of the last candidate is an error before the baseline's runs start."""
    gate = tmp_path / "g.yaml"
    gate.write_text(f"name: t\ntasks: {{mmlu: [--per-subject, '1']}}\nruns_dir: {tmp_path / 'runs'}\n"
                    f"baseline: {{recipe: bf16}}\ncandidates: [{{recipe: fp8-modelopt}}, {side}]\n"
                    "metrics: {mmlu.cloze.acc: 0.1}\n")
    assert cli.main(["gate", str(gate)]) == 3
    err = capsys.readouterr().err
    assert f"evalsuite gate: error: {gate}: {msg}" in err and "gate t: evalsuite run" not in err
    assert not (tmp_path / "runs").exists()


def test_result_files_are_checked_before_the_work_and_their_folders_made(tmp_path, capsys):
    """--junit or --json naming a folder, or a runs_dir that is a file, is an error before a gate's
    first run; a missing folder on the way to the file is made, so a verdict computed is also written."""
    b = write_run(tmp_path / "base", "fp8-official", [1, 0] * 20)
    c = write_run(tmp_path / "cand", "fp8-modelopt", [1, 0] * 20)
    gate = tmp_path / "g.yaml"
    gate.write_text(f"name: t\ntasks: {{mmlu: [--per-subject, '1']}}\nruns_dir: {tmp_path / 'runs'}\n"
                    f"baseline: {{recipe: bf16}}\ncandidates: [{{run: {c}}}]\nmetrics: {{mmlu.cloze.acc: 0.1}}\n")
    for flag in ("--junit", "--json"):
        assert cli.main(["gate", str(gate), flag, str(tmp_path)]) == 3
        assert f"{flag} '{tmp_path}' is a folder; valid: a file path" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no run started
    (tmp_path / "runs").write_text("a file where the gate's runs would go\n")
    assert cli.main(["gate", str(gate)]) == 3
    assert f"'{tmp_path / 'runs'}' (the gate file's runs_dir) is not a folder" in capsys.readouterr().err
    out = tmp_path / "new" / "folder" / "compare.json"
    assert cli.main(["compare", str(b), str(c), "--json", str(out)]) in (0, 1, 2)
    assert json.loads(out.read_text())["candidates"]


def test_the_shipped_and_documented_gate_files_name_valid_recipes_and_settings(tmp_path):
    """tasks/gates/*.yaml and docs/CI.md's example load and pass the gate's own check of its sides."""
    from evalsuite.gate import check_sides, load_gate

    root = Path(__file__).resolve().parent.parent
    example = (root / "docs" / "CI.md").read_text().split("## The gate file")[1].split("```yaml\n")[1].split("```")[0]
    (tmp_path / "ci-md.yaml").write_text(example)
    files = sorted((root / "tasks" / "gates").glob("*.yaml")) + [tmp_path / "ci-md.yaml"]
    assert len(files) >= 3
    for f in files:
        gate = load_gate(f)
        check_sides(gate)
        assert any("recipe_config" in c for c in gate.candidates) or f.parent != tmp_path, f


def test_gate_device_goes_after_the_tasks_own_and_every_setting_reaches_the_run():
    """``gate --device`` goes to every run the gate produces, after the task's args, so that the
    run's own parser takes it over a --device there; each of a side's settings is its own
    ``--recipe-config``, and the run's parser keeps them all."""
    from evalsuite.gate import Gate, run_argv

    gate = Gate(name="t", path=Path("g.yaml"), tasks={"mmlu": ["--per-subject", "1", "--device", "cpu"]},
                model="smollm2-135m", runs_dir=Path("runs"), baseline={"recipe": "bf16"}, candidates=[], metrics={})
    side = {"recipe": "int4-awq", "recipe_config": {"kernel": "off", "resmooth": False}}
    argv = run_argv(gate, side, "mmlu", Path("runs/x"), device="cuda")
    assert " ".join(argv) == ("run mmlu --model smollm2-135m --recipe int4-awq --dtype bfloat16 --per-subject 1 "
                              "--device cpu --device cuda --output runs/x --no-progress "
                              "--recipe-config kernel=\"off\" --recipe-config resmooth=false")
    parser = argparse.ArgumentParser(parents=[cli._run_options()])
    opts = parser.parse_known_args(argv[2:])[0]  # --per-subject is the runner's
    assert opts.device == "cuda"
    assert cli.parse_recipe_config(opts.recipe_config) == {"kernel": "off", "resmooth": False}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_gate_and_study_refuse_a_missing_device_before_their_first_run(tmp_path, capsys):
    """A --device this machine lacks stops a gate or a study before it starts any run; a task's
    own --device is refused by its run, and no folder is named for deletion (there is none)."""
    tasks = "tasks: {mmlu: [--per-subject, '1', --device, cuda]}"
    gate_file = tmp_path / "g.yaml"
    gate_file.write_text(f"name: t\n{tasks}\nruns_dir: {tmp_path / 'runs'}\nbaseline: {{recipe: bf16}}\n"
                         "candidates: [{recipe: int4-awq}]\nmetrics: {mmlu.cloze.acc: 0.1}\n")
    gate_file.with_name("cpu.yaml").write_text(gate_file.read_text().replace(", --device, cuda", ""))
    assert cli.main(["gate", str(tmp_path / "cpu.yaml"), "--device", "cuda"]) == 3
    err = capsys.readouterr().err
    assert "evalsuite gate: error: --device 'cuda': no CUDA device is available here" in err
    assert "gate t: evalsuite run" not in err  # no run started
    assert cli.main(["study", "--root", str(tmp_path), "--recipes", "fp8-official", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "evalsuite: error: --device 'cuda': no CUDA device is available here" in err and "study study:" not in err
    assert not (tmp_path / "study").exists()
    assert cli.main(["gate", str(gate_file)]) == 3  # the task's own --device: its run refuses it
    err = capsys.readouterr().err
    assert "--device 'cuda': no CUDA device is available here" in err
    assert "was refused (evalsuite run exited 2; the reason is above)" in err and "delete" not in err
    assert not any((tmp_path / "runs").glob("*/run.json"))


def test_study_names_a_run_folder_of_another_configuration(tmp_path, capsys):
    """The study resumes its runs too, and says the same about a folder of other settings."""
    for recipe in ("bf16", "fp8-official"):
        stale = tmp_path / "study" / "runs" / f"{recipe}-mmlu-formulation-cloze-per-subject-1"
        stale.mkdir(parents=True)
        (stale / "run.json").write_text(json.dumps({"config_hash": "of-an-older-version", "status": "complete"}))
    rc = cli.main(["study", "--root", str(tmp_path), "--recipes", "fp8-official", "bf16", "--per-subject", "1"])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert rc == 2 and "holds a run with a different configuration" in text
    assert "was refused (evalsuite run exited 2; the reason is above)" in text
    assert f"If the reason is that {tmp_path / 'study' / 'runs'}" in text and "rerun to resume" not in text


def test_study_runs_every_step_on_its_device(tmp_path, monkeypatch):
    """--device reaches every run and the benchmark (the report runs no model)."""
    from evalsuite.study import plan_study, run_study

    calls = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    (tmp_path / "s").mkdir()
    plan = plan_study("s", "smollm2-135m", ["fp8-official", "bf16"], full=False, per_subject=None, per_article=None,
                      root=tmp_path, mtbench_questions=2, device="cpu")
    assert run_study(plan, log=lambda m: None) == 0
    steps = [(argv[0], argv[1] if argv[0] == "run" else "") for argv in calls]
    assert steps == [("run", "mmlu"), ("run", "perplexity")] * 2 + [("run", "mt-bench")] * 2 + \
        [("bench", ""), ("report", "")]
    for argv in calls[:-1]:
        assert argv[argv.index("--device") + 1] == "cpu", argv
    assert "--device" not in calls[-1]
    # the default baseline is the reference case's; the benchmark's speedups and the report use it
    assert [argv[argv.index("--baseline") + 1] for argv in calls[-2:]] == ["fp8-official"] * 2


def test_study_baseline_is_any_of_its_recipes(tmp_path, monkeypatch):
    """--baseline bf16: the report's verdicts and the benchmark's speedups are against BF16, and the
    study needs no fp8-official run."""
    from evalsuite.study import plan_study, run_study

    calls = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    (tmp_path / "s").mkdir()
    plan = plan_study("s", "smollm2-135m", ["bf16", "int4-awq"], full=False, per_subject=None, per_article=None,
                      root=tmp_path, baseline="bf16")
    assert run_study(plan, log=lambda m: None) == 0
    assert [argv[argv.index("--recipe") + 1] for argv in calls if argv[0] == "run"] == ["bf16"] * 2 + ["int4-awq"] * 2
    bench, report = calls[-2:]
    assert bench[0] == "bench" and bench[bench.index("--baseline") + 1] == "bf16"
    assert report[0] == "report" and report[report.index("--baseline") + 1] == "bf16"
    assert json.loads((tmp_path / "s" / "study.json").read_text())["baseline"] == "bf16"


def test_side_from_run_weights_questions_by_subject_size(tmp_path):
    """An MMLU subset's accuracy is stratified by subject size (evalsuite.stats); the compared value
    is the same stratified estimate."""
    from evalsuite.runners.mmlu import load_mmlu
    from evalsuite.taskdef import load_task

    sizes = load_mmlu(load_task("mmlu")).subject_sizes()
    correct = [1 if SUBJECTS[i % 8] in ("anatomy", "philosophy") else 0 for i in range(80)]
    side = side_from_run(write_run(tmp_path / "r", "bf16", correct))
    items = side.metrics["mmlu.cloze.acc"].items
    got = sum(i.num for i in items.values()) / sum(i.den for i in items.values())
    assert got == pytest.approx((sizes["anatomy"] + sizes["philosophy"]) / sum(sizes[s] for s in SUBJECTS))


def test_runs_of_different_setups_are_not_compared(tiny_dir, tmp_path, capsys):
    """Runs made by `evalsuite run mmlu`: a 1-shot candidate against a 0-shot baseline would credit
    the recipe with the prompt's effect, and is refused naming what differs; a candidate on another
    subset (item selection only) is paired on the questions both hold."""
    def run(name: str, *extra: str) -> str:
        out = tmp_path / name
        assert cli.main(["run", "mmlu", "--model", str(tiny_dir), "--dtype", "float32", "--formulation", "cloze",
                         "--subjects", "anatomy", "marketing", "--output", str(out), "--no-progress", *extra]) == 0
        return str(out)

    base = run("zero", "--per-subject", "4")
    other_subset = run("zero-more", "--per-subject", "6", "--seed", "7")
    one_shot = run("one", "--per-subject", "4", "--num-fewshot", "1")
    capsys.readouterr()
    assert cli.main(["compare", base, one_shot, "--baseline", base]) == 3  # an error, not INCONCLUSIVE (2)
    assert ("mmlu.cloze.acc: the baseline and the candidate ran the task differently (num_fewshot 0 vs 1); a paired "
            "comparison needs runs with the same setup") in capsys.readouterr().err
    assert cli.main(["compare", base, other_subset, "--baseline", base, "--tolerance", "mmlu=0.5"]) in (0, 2)
    assert "mmlu.cloze.acc" in capsys.readouterr().out
    # the report states the setup the sides share, and the items each ran
    assert cli.main(["report", "r", base, other_subset, "--baseline", base, "--root", str(tmp_path)]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    task_file = json.loads(Path(base, "run.json").read_text())["task_config_sha256"][:12]
    assert f"- mmlu: num_fewshot 0, data \"embedded\", task_config_sha256 {task_file}, data.sha256 9f954bf40f4d" in md
    assert '  - items, bf16@zero: formulations ["cloze"], per_subject 4, seed 1234, subjects ["anatomy", "marketing"]' in md
    assert '  - items, bf16@zero-more: formulations ["cloze"], per_subject 6, seed 7, subjects ["anatomy", "marketing"]' \
        in md


def test_an_lm_eval_run_with_a_chat_template_is_not_compared_with_a_plain_one():
    """lm-eval runs record their chat format and --gen-kwargs only when given; a run without them
    still differs from one with them."""
    from evalsuite.compare import Metric, check_same_setup, run_setup

    plain = {"task": "lm-eval", "config": {"tasks": ["t"], "num_fewshot": None, "seed": 1234, "task_files": "h"}}
    chat = {**plain, "config": {**plain["config"], "chat": {"apply_chat_template": True}}}
    metrics = [Metric("lm-eval.t.acc", "accuracy", 0.5, setup=run_setup(r)) for r in (plain, chat, plain)]
    check_same_setup(metrics[0], metrics[2])
    with pytest.raises(ValueError, match="ran the task differently \\(chat None vs \\{'apply_chat_template': True\\}\\)"):
        check_same_setup(metrics[0], metrics[1])


# ---------------------------------------------------------------------------------- run index

def test_run_index_records_and_filters(tmp_path):
    index = RunIndex(tmp_path / "index.sqlite")
    run = {"task": "mmlu", "model": {"name": "m"}, "recipe": {"name": "bf16"}, "status": "complete",
           "sessions": [{"finished": "2026-11-27T10:00:00"}], "metrics": {}}
    a = index.record(tmp_path / "a", run)
    assert index.record(tmp_path / "a", {**run, "status": "incomplete"}) == a  # a resumed run updates its row
    index.record(tmp_path / "b", {**run, "recipe": {"name": "int4-awq"}})
    assert [r.recipe for r in index.query(task="mmlu")] == ["bf16", "int4-awq"]
    assert index.get(a).status == "incomplete"
    assert [r.run_dir for r in index.query(recipe="int4-awq")] == [str((tmp_path / "b").resolve())]


def test_runs_marks_and_prunes_runs_whose_folders_are_gone(tmp_path, capsys, monkeypatch):
    from evalsuite.cli import main

    path = tmp_path / "index.sqlite"
    index = RunIndex(path)
    run = {"task": "mmlu", "model": {"name": "m"}, "recipe": {"name": "bf16"}, "status": "complete",
           "sessions": [{"finished": "2026-11-27T10:00:00"}], "metrics": {}}
    for name in ("kept", "deleted", "other-task"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps(run))
        index.record(tmp_path / name, {**run, "task": "perplexity"} if name == "other-task" else run)
    shutil.rmtree(tmp_path / "deleted")
    shutil.rmtree(tmp_path / "other-task")
    assert main(["runs", "--index", str(path), "--task", "mmlu"]) == 0
    out = capsys.readouterr().out
    assert f"{(tmp_path / 'deleted').resolve()}  (folder gone)" in out and "1 run(s) listed have no folder" in out
    monkeypatch.setenv("EVALSUITE_INDEX", str(path))
    deleted = next(r.id for r in index.query() if r.run_dir.endswith("deleted"))
    assert main(["compare", str(deleted), "1"]) == 3
    assert f"run {deleted} of the run index: its folder {(tmp_path / 'deleted').resolve()} is gone" in \
        capsys.readouterr().err
    assert main(["runs", "--index", str(path), "--task", "mmlu", "--prune"]) == 0
    assert "pruned 1 run(s)" in capsys.readouterr().out
    # only the listed runs are pruned: the perplexity run, also gone, was not listed
    assert sorted(Path(r.run_dir).name for r in index.query()) == ["kept", "other-task"]


CRASH = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("BEGIN")
db.execute("INSERT INTO runs (run_dir, finished) VALUES ('half-written', 'x')")
os._exit(1)  # killed before the commit
"""

WRITER = """
import sys
from evalsuite.runindex import RunIndex
index = RunIndex(sys.argv[1])
for i in range(40):
    index.record(f"{sys.argv[2]}-{i}", {"task": "mmlu", "recipe": {"name": sys.argv[2]}, "sessions": [{}]})
"""


def test_run_index_survives_a_crash_mid_write_and_concurrent_writers(tmp_path):
    path = tmp_path / "index.sqlite"
    index = RunIndex(path)
    index.record(tmp_path / "kept", {"task": "mmlu", "sessions": [{}]})
    assert subprocess.run([sys.executable, "-c", CRASH, str(path)]).returncode == 1
    assert [Path(r.run_dir).name for r in index.query()] == ["kept"]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name]) for name in ("p1", "p2")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(index.query(recipe="p1")) == 40 and len(index.query(recipe="p2")) == 40
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_gate_runs_lm_eval_tasks_and_gates_their_metrics(tmp_path, tiny_dir, capsys):
    """``lm-eval`` among a gate's tasks runs `evalsuite run --harness lm-eval ARGS` per recipe;
    its metrics are gated by name (``lm-eval.TASK.METRIC``) like the suite's own, paired
    question by question."""
    (tmp_path / "g.yaml").write_text(
        f"name: t\nmodel: {tiny_dir}\ndtype: float32\nruns_dir: {tmp_path / 'runs'}\n"
        "tasks: {lm-eval: [--task, evalsuite_mmlu_anatomy, --limit, '6']}\n"
        "baseline: {recipe: bf16}\ncandidates: [{recipe: int4-rtn}]\n"
        "metrics: {lm-eval.evalsuite_mmlu_anatomy.acc: {absolute: 0.5}}\n")
    assert cli.main(["gate", str(tmp_path / "g.yaml"), "--json", str(tmp_path / "g.json")]) == 0
    (cand,) = json.loads((tmp_path / "g.json").read_text())["candidates"]
    (metric,) = cand["metrics"]
    assert metric["metric"] == "lm-eval.evalsuite_mmlu_anatomy.acc" and metric["n"] == 6
    assert metric["method"] == "paired" and metric["verdict"] == PASS
    runs = {r: json.loads((tmp_path / "runs" / f"{r}-lm-eval" / "run.json").read_text()) for r in ("bf16", "int4-rtn")}
    assert {r: run["recipe"]["name"] for r, run in runs.items()} == {"bf16": "bf16", "int4-rtn": "int4-rtn"}
    assert [metric["baseline"], metric["candidate"]] == [
        runs[r]["metrics"]["evalsuite_mmlu_anatomy"]["acc,none"] for r in ("bf16", "int4-rtn")]


def test_an_lm_eval_tag_is_compared_task_by_task(tmp_path):
    """A tag (lm-eval reports its tasks one by one and names no members) gives one metric per
    task, each from its own documents; the values are the ones lm-eval reported."""
    from evalsuite.compare import side_from_run

    folder = tmp_path / "tagged"
    folder.mkdir()
    accs = {"ta": [1, 0, 1, 1], "tb": [0, 0, 1]}
    (folder / "samples.jsonl").write_text("".join(
        json.dumps({"id": f"{t}/{i}", "task": t, "doc_id": i, "filter": "none", "acc": float(a)}) + "\n"
        for t, values in accs.items() for i, a in enumerate(values)))
    run = {"task": "lm-eval", "status": "complete", "config": {"tasks": ["my_tag"]}, "recipe": {"name": "bf16"},
           "model": {"name": "tiny"}, "lm_eval": {"group_subtasks": {}},
           "metrics": {t: {"alias": t, "acc,none": sum(v) / len(v), "acc_stderr,none": 0.1} for t, v in accs.items()}}
    (folder / "run.json").write_text(json.dumps(run))
    metrics = side_from_run(folder).metrics
    assert sorted(metrics) == ["lm-eval.ta.acc", "lm-eval.tb.acc"]
    assert metrics["lm-eval.ta.acc"].value == 0.75 and metrics["lm-eval.tb.acc"].value == pytest.approx(1 / 3)
    assert sorted(metrics["lm-eval.tb.acc"].items) == ["tb/0", "tb/1", "tb/2"]


def test_the_advised_number_of_items_decides_a_replicated_sample():
    """An INCONCLUSIVE verdict names how many paired items would decide it. With few clusters the
    interval's t quantile (2.26 at 9 degrees of freedom) is well above 1.96; the advice must use
    it, or it names fewer items than the sample that left the question open (before: 186 of 200).
    The check is independent of the formula: the sample copied until it holds the advised items
    (new clusters each time, the same variance per item) is decided."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2, 200)
    cand = np.where(rng.random(200) < 0.1, 1 - base, base)
    clusters = [f"s{i % 10}" for i in range(200)]
    probe = compare_metric(_metric(base, clusters=clusters), _metric(cand, clusters=clusters), Tolerance(1.0))
    half = (probe.interval[1] - probe.interval[0]) / 2
    tol = Tolerance(0.9 * half - probe.gain)  # the margin at 0.9 of the half-width: undecided
    cmp = compare_metric(_metric(base, clusters=clusters), _metric(cand, clusters=clusters), tol)
    assert cmp.verdict == INCONCLUSIVE and cmp.n_to_decide > 200
    copies = math.ceil(cmp.n_to_decide / 200)
    big_clusters = [f"{c}-{k}" for k in range(copies) for c in clusters]
    big = compare_metric(_metric(np.tile(base, copies), clusters=big_clusters),
                         _metric(np.tile(cand, copies), clusters=big_clusters), tol)
    assert big.gain == pytest.approx(cmp.gain) and big.verdict == PASS


def test_answers_that_move_too_much_fail_whatever_the_accuracy():
    """max_flip_rate and max_kl: a candidate of the baseline's accuracy that changes 40% of its
    answers' correctness (as many right->wrong as wrong->right), or whose answer distributions
    moved by a KL above the limit, fails; within the limits the interval decides."""
    base = np.array([1, 0] * 1000)
    cand = base.copy()
    cand[:800] = 1 - cand[:800]  # 400 right->wrong, 400 wrong->right
    b, c = _metric(base), _metric(cand)
    assert compare_metric(b, c, Tolerance(0.05, max_flip_rate=0.5)).verdict == PASS
    assert compare_metric(b, c, Tolerance(0.02)).verdict == INCONCLUSIVE  # interval +-0.028
    moved = compare_metric(b, c, Tolerance(0.02, max_flip_rate=0.25))  # decided by the flips: no advice
    assert moved.gain == 0 and moved.flips["rate"] == pytest.approx(0.4)
    assert moved.verdict == FAIL and moved.n_to_decide is None
    assert moved.reason.startswith("40.0% of answers changed correctness (limit 25.0%)")
    p, q = (0.7, 0.1, 0.1, 0.1), (0.4, 0.2, 0.2, 0.2)
    kl = 0.7 * math.log(0.7 / 0.4) + 3 * 0.1 * math.log(0.1 / 0.2)  # by hand: 0.18383
    with_dist = [Metric("m", "accuracy", float(np.mean(v)), None, len(v),
                        {str(i): Item(float(x), 1.0, str(i), d) for i, x in enumerate(v)})
                 for v, d in ((base, p), (base, q))]
    assert compare_metric(*with_dist, Tolerance(0.05, max_kl=0.2)).verdict == PASS
    drifted = compare_metric(*with_dist, Tolerance(0.05, max_kl=0.1))
    assert drifted.mean_kl == pytest.approx(kl) and drifted.verdict == FAIL
    assert drifted.reason.startswith(f"mean KL {kl:.4f} (limit 0.1)")
    assert Tolerance.parse({"absolute": 0.01, "max_flip_rate": 0.25, "max_kl": 1}, "t") == \
        Tolerance(0.01, False, 0.25, 1.0)
    with pytest.raises(ValueError, match="optionally with max_flip_rate and max_kl"):
        Tolerance.parse({"absolute": 0.01, "max_flips": 0.25}, "t")
