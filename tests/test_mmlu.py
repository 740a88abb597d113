"""MMLU data, prompts (against lm-eval's own templates), subsets, records and resume."""

from __future__ import annotations

import json
import os

import lm_eval
import pytest
import yaml
from lm_eval.utils import apply_template

from evalsuite.runners import mmlu
from evalsuite.runners.mmlu import MMLUConfig, Question, load_mmlu, render_context, run_mmlu, select
from evalsuite.taskdef import TaskDefinitionError, load_task, parse_task

LM_EVAL_MMLU = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "mmlu")


def _lm_eval_yaml(*parts):
    with open(os.path.join(LM_EVAL_MMLU, *parts)) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def task():
    return load_task("mmlu")


@pytest.fixture(scope="module")
def data(task):
    return load_mmlu(task)


Q = Question("mmlu/0", "college_physics", "  Which force?  ", ("gravity", "friction", "tension", "none"), 2)
SHOTS = [Question("mmlu/1", "college_physics", "What is 1+1?", ("1", "2", "3", "4"), 1),
         Question("mmlu/2", "college_physics", "Unit of force?", ("newton", "joule", "watt", "volt"), 0)]


def _lm_eval_context(template_file, subject_file, q, shots, choices_of):
    """lm-eval's context: description, then each exemplar's text + " " + target + "\\n\\n", then the question."""
    tpl = _lm_eval_yaml(*template_file)
    desc = _lm_eval_yaml(*subject_file)["description"]

    def doc(x):
        return {"question": x.question, "choices": list(x.choices), "answer": x.target}

    exemplars = "".join(apply_template(tpl["doc_to_text"], doc(s)) + " " + choices_of(s)[s.target] + "\n\n" for s in shots)
    return desc + exemplars + apply_template(tpl["doc_to_text"], doc(q))


@pytest.mark.parametrize("shots", [[], SHOTS])
def test_letter_prompt_is_lm_eval_mmlu(task, shots):
    ref = _lm_eval_context(("default", "_default_template_yaml"), ("default", "mmlu_college_physics.yaml"), Q, shots,
                           lambda s: _lm_eval_yaml("default", "_default_template_yaml")["doc_to_choice"])
    assert render_context(task.formulation("letter"), Q, shots) == ref


@pytest.mark.parametrize("shots", [[], SHOTS])
def test_cloze_prompt_is_lm_eval_mmlu_continuation(task, shots):
    ref = _lm_eval_context(("continuation", "_continuation_template_yaml"),
                           ("continuation", "mmlu_college_physics.yaml"), Q, shots, lambda s: list(s.choices))
    assert render_context(task.formulation("cloze"), Q, shots) == ref


def test_generative_prompt_is_model_optimizer(task):
    # Model Optimizer's format_subject("college_physics") == " college physics"; its gen_prompt
    # writes "about {format_subject(subject)}." and format_example keeps the raw question.
    want = ("The following are multiple choice questions (with answers) about  college physics.\n\n"
            "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
            "  Which force?  \nA. gravity\nB. friction\nC. tension\nD. none\nAnswer:")
    assert render_context(task.formulation("generative"), Q, SHOTS[:1]) == want


def test_embedded_data_counts(data, task):
    assert len(data.questions) == 14042
    assert len(data.rejected) == 2
    assert all("correct_answer='answer'" in r["reason"] for r in data.rejected)
    assert len(data.subject_sizes()) == 57
    assert set(data.subject_sizes()) == set(task.categories)


def test_subset_is_stratified_seeded_and_excludes_exemplars(data, task):
    ex0, s0 = select(data, task, MMLUConfig(per_subject=3, seed=1))
    ex5, s5 = select(data, task, MMLUConfig(per_subject=3, seed=1, num_fewshot=5))
    _, other = select(data, task, MMLUConfig(per_subject=3, seed=2))
    assert len(s0) == 3 * 57 and [q.id for q in s0] == [q.id for q in s5]
    assert [q.id for q in other] != [q.id for q in s0]
    pool = {q.id for qs in ex5.values() for q in qs}
    assert len(pool) == 5 * 57 and not pool & {q.id for q in s0}
    assert all(len(v) == 0 for v in ex0.values())
    _, full5 = select(data, task, MMLUConfig(num_fewshot=5))
    assert len(full5) == 14042 - 5 * 57


def test_config_validation(task):
    for cfg, msg in [(MMLUConfig(num_fewshot=6), "num_fewshot=6; valid: 0..5"),
                     (MMLUConfig(formulations=("letters",)), "unknown formulation 'letters'.*valid: letter, cloze"),
                     (MMLUConfig(per_subject=0), "per_subject=0"),
                     (MMLUConfig(subjects=("astrology",)), "unknown subjects \\['astrology'\\]")]:
        with pytest.raises((ValueError, KeyError), match=msg):
            cfg.validate(task)


def test_task_yaml_is_strict():
    raw = yaml.safe_load(open(mmlu.load_task.__globals__["TASKS_DIR"] / "mmlu.yaml"))
    raw["formulations"]["letter"]["choise"] = "letters"
    with pytest.raises(TaskDefinitionError, match="unknown keys \\['choise'\\]"):
        parse_task(raw)
    raw = yaml.safe_load(open(mmlu.load_task.__globals__["TASKS_DIR"] / "mmlu.yaml"))
    raw["categories"]["anatomy"] = "science"
    with pytest.raises(TaskDefinitionError, match="'science'; valid: stem, humanities"):
        parse_task(raw)


def test_malformed_rows_rejected_not_scored(task):
    rows = [{"question": "q", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
             "correct_answer": "B", "topic": "anatomy"},
            {"question": "question", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
             "correct_answer": "answer", "topic": "anatomy"},
            {"question": "q", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
             "correct_answer": "C", "topic": "astrology"}]
    qs, rejected = mmlu.parse_rows(rows, task)
    assert [q.target for q in qs] == [1]
    assert [r["row"] for r in rejected] == [1, 2]


SMALL = dict(subjects=("abstract_algebra", "anatomy", "marketing"), per_subject=4)


def test_run_writes_lossless_records(tiny, tmp_path):
    res = run_mmlu(tiny, MMLUConfig(formulations=("letter", "cloze"), **SMALL), tmp_path / "run", progress=False)
    records = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert len(records) == 2 * 12
    r = next(r for r in records if r["formulation"] == "cloze")
    assert r["prediction"] == max(range(4), key=lambda i: r["logprobs"][i])
    assert r["prediction_norm"] == max(range(4), key=lambda i: r["logprobs"][i] / r["char_counts"][i])
    assert r["correct"] == (r["prediction"] == r["target"]) and len(r["token_counts"]) == 4
    run = json.loads(open(tmp_path / "run" / "run.json").read())
    assert run["status"] == "complete" and run["data"]["rejected_rows"] == 2
    assert run["recipe"]["name"] == "bf16" and run["model"]["weights_sha256"]
    acc = res.metrics["letter"]["acc"]["overall"]["acc"]
    by_subject = {}
    for r in records:
        if r["formulation"] == "letter":
            by_subject.setdefault(r["subject"], []).append(r["correct"])
    sizes = {"abstract_algebra": 100, "anatomy": 135, "marketing": 234}
    want = sum(sizes[s] * sum(v) / len(v) for s, v in by_subject.items()) / sum(sizes.values())
    assert acc == pytest.approx(want)


def test_interrupted_run_resumes_without_recomputing(tiny, tmp_path, monkeypatch):
    cfg = MMLUConfig(formulations=("letter",), **SMALL)
    out = tmp_path / "run"
    run_mmlu(tiny, cfg, out, progress=False)
    full = open(out / "samples.jsonl").read().splitlines()
    # Simulate a crash: the last 5 records never written, the 6th-to-last half-written.
    kept = full[:-6]
    (out / "samples.jsonl").write_text("\n".join(kept) + "\n" + full[-6][:40])
    scored = []
    real = mmlu.score
    monkeypatch.setattr(mmlu, "score", lambda model, reqs, **kw: scored.extend(reqs) or real(model, reqs, **kw))
    run_mmlu(tiny, cfg, out, progress=False)
    assert len(scored) == 6 * 4  # only the six missing questions, four choices each
    again = open(out / "samples.jsonl").read().splitlines()
    by_id = lambda lines: {json.loads(x)["id"]: json.loads(x)["logprobs"] for x in lines}  # noqa: E731
    before, after = by_id(full), by_id(again)
    assert len(again) == len(full) and set(after) == set(before)
    for qid, lps in before.items():
        assert after[qid] == pytest.approx(lps, abs=1e-5)


def test_run_dir_refuses_a_different_config(tiny, tmp_path):
    run_mmlu(tiny, MMLUConfig(formulations=("letter",), **SMALL), tmp_path / "run", progress=False)
    with pytest.raises(RuntimeError, match="different configuration"):
        run_mmlu(tiny, MMLUConfig(formulations=("letter",), seed=9, **SMALL), tmp_path / "run", progress=False)


def test_generative_formulation_runs(tiny, tmp_path):
    res = run_mmlu(tiny, MMLUConfig(formulations=("generative",), **SMALL), tmp_path / "g", progress=False)
    records = [json.loads(line) for line in open(tmp_path / "g" / "samples.jsonl")]
    assert len(records) == 12 and all(len(r["generated_tokens"]) <= 2 for r in records)
    for r in records:
        assert r["correct"] == r["generated"].strip().startswith("ABCD"[r["target"]])
    assert res.metrics["generative"]["n"] == 12


@pytest.mark.parametrize("context", ["Question: Which?\nAnswer:", "Question: Which?\nAnswer: "])
def test_encode_choices_is_lm_eval_encode_pair(tiny, context):
    """The split of context and continuation tokens is lm-eval's own TemplateLM._encode_pair."""
    from types import SimpleNamespace

    from lm_eval.api.model import TemplateLM

    tok = tiny.tokenizer
    lm = SimpleNamespace(backend="causal", tok_encode=lambda s, **kw: tok.encode(s))
    conts = [" A", " B", " Femur", "x"]
    ours = mmlu.encode_choices(tok, context, conts)
    assert ours == [TemplateLM._encode_pair(lm, context, c) for c in conts]
