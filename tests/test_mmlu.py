"""MMLU data, prompts (against lm-eval's own templates), subsets, records and resume."""

from __future__ import annotations

import json
import os

import lm_eval
import pytest
import torch
import yaml
from lm_eval.utils import apply_template

from evalsuite.backends.engine import EngineBackend
from evalsuite.runners import mmlu
from evalsuite.runners.mmlu import (
    MMLUConfig,
    Question,
    generative_outcome,
    load_mmlu,
    prepare_mmlu,
    render_context,
    run_mmlu,
    select,
)
from evalsuite.taskdef import TaskDefinitionError, load_task
from evalsuite.taskdef import parse_multiple_choice_task as parse_task

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
                     (MMLUConfig(formulations=()), "no formulation given; valid: letter, cloze, generative"),
                     (MMLUConfig(per_subject=0), "per_subject=0"),
                     (MMLUConfig(per_subject=-1), "per_subject=-1"),
                     (MMLUConfig(subjects=("astrology",)), "unknown subjects \\['astrology'\\]"),
                     (MMLUConfig(data="no/such/file.jsonl"), "data='no/such/file.jsonl'; valid: 'embedded'")]:
        with pytest.raises((ValueError, KeyError), match=msg):
            cfg.validate(task)


def test_a_data_file_without_valid_questions_is_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"{empty} holds no valid MMLU questions \\(0 rows rejected\\)"):
        prepare_mmlu(MMLUConfig(data=str(empty)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
                               "correct_answer": "E", "topic": "anatomy"}) + "\n")
    with pytest.raises(ValueError, match="holds no valid MMLU questions \\(1 rows rejected, e.g. row 0: "
                                         "correct_answer='E' is not one of A-D"):
        prepare_mmlu(MMLUConfig(data=str(bad)))
    with pytest.raises(ValueError, match="not valid JSON"):
        (tmp_path / "garbled.jsonl").write_text("{not json\n")
        prepare_mmlu(MMLUConfig(data=str(tmp_path / "garbled.jsonl")))


def test_data_file_runs_its_own_questions(tiny, tmp_path):
    """--data FILE: the file's rows are the questions (ids by row), its hash is in the record."""
    import hashlib

    rows = [{"question": f"What is {i} + {i}?", "answer_a": str(2 * i), "answer_b": str(i), "answer_c": "0",
             "answer_d": "1", "correct_answer": "A", "topic": "elementary mathematics"} for i in range(7)]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_mmlu(tiny, MMLUConfig(formulations=("cloze",), data=str(path)), tmp_path / "run", progress=False)
    records = [json.loads(x) for x in open(tmp_path / "run" / "samples.jsonl")]
    assert sorted(r["id"] for r in records) == [f"mmlu/{i}" for i in range(7)]
    assert {r["subject"] for r in records} == {"elementary_mathematics"}
    assert [r["choices"] for r in sorted(records, key=lambda r: r["id"])][3] == ["6", "3", "0", "1"]
    assert res.run["data"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert res.run["data"]["source"] == str(path)


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


def test_cais_mmlu_rows_are_read_as_their_embedded_twins(data, task, tmp_path):
    """A JSONL file in cais/mmlu's schema (what `datasets` exports: question, subject, choices,
    answer index) gives the questions of the same rows in the embedded schema; its malformed rows
    are rejected with the reason."""
    raw = [json.loads(x) for x in open(task.data.verified_path())][:40]
    cais = [{"question": r["question"], "subject": r["topic"].lower().replace(" ", "_"),
             "choices": [r[f"answer_{c}"] for c in "abcd"], "answer": "ABCD".index(r["correct_answer"])} for r in raw]
    path = tmp_path / "cais.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in cais))
    assert mmlu.load_mmlu(task, str(path)).questions == mmlu.parse_rows(raw, task)[0]
    assert len(mmlu.load_mmlu(task, str(path)).questions) == 40
    bad = [{**cais[0], "choices": cais[0]["choices"][:3]}, {**cais[0], "answer": 4}, {**cais[0], "answer": True}]
    qs, rejected = mmlu.parse_rows(bad, task)
    assert qs == [] and [r["reason"] for r in rejected] == [
        f"choices={cais[0]['choices'][:3]!r}; valid: a list of 4 answers",
        "answer=4; valid: the correct choice's index, 0-3", "answer=True; valid: the correct choice's index, 0-3"]


SMALL = dict(subjects=("abstract_algebra", "anatomy", "marketing"), per_subject=4)


def _hf_continuation_logprob(hf, tokenizer, context: str, continuation: str) -> float:
    """Reference: transformers' own model scores lm-eval's split of context and continuation."""
    from types import SimpleNamespace

    from lm_eval.api.model import TemplateLM

    fake = SimpleNamespace(backend="causal", tok_encode=lambda s, **kw: tokenizer.encode(s))
    ctx, cont = TemplateLM._encode_pair(fake, context, continuation)
    with torch.no_grad():
        logits = hf(torch.tensor([ctx + cont])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_run_writes_lossless_records(tiny, hf_tiny, tmp_path, task):
    """The stored log-likelihoods are transformers' own, for every choice of every record, and
    the prediction is the choice transformers ranks first."""
    res = run_mmlu(tiny, MMLUConfig(formulations=("letter", "cloze"), **SMALL), tmp_path / "run", progress=False)
    records = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert len(records) == 2 * 12
    questions = {q.id: q for q in load_mmlu(task).questions}
    for r in records:
        form = task.formulation(r["formulation"])
        context = render_context(form, questions[r["id"]], [])
        ref = [_hf_continuation_logprob(hf_tiny, tiny.tokenizer, context, " " + c) for c in r["choices"]]
        assert r["logprobs"] == pytest.approx(ref, abs=2e-4)
        ranked = sorted(range(4), key=lambda i: ref[i], reverse=True)
        if ref[ranked[0]] - ref[ranked[1]] > 1e-3:
            assert r["prediction"] == ranked[0]
        assert r["correct"] == (r["prediction"] == questions[r["id"]].target)
    run = json.loads(open(tmp_path / "run" / "run.json").read())
    assert run["status"] == "complete" and run["data"]["rejected_rows"] == 2
    assert run["recipe"]["name"] == "bf16" and run["backend"]["kind"] == "engine"
    # subject-weighted accuracy, weights = the subjects' sizes in the full test set (hand counts)
    by_subject = {}
    for r in records:
        if r["formulation"] == "letter":
            by_subject.setdefault(r["subject"], []).append(r["correct"])
    sizes = {"abstract_algebra": 100, "anatomy": 135, "marketing": 234}
    want = sum(sizes[s] * sum(v) / len(v) for s, v in by_subject.items()) / sum(sizes.values())
    assert res.metrics["letter"]["acc"]["overall"]["acc"] == pytest.approx(want)


def test_interrupted_run_resumes_without_recomputing(tiny, tmp_path, monkeypatch):
    cfg = MMLUConfig(formulations=("letter",), **SMALL)
    out = tmp_path / "run"
    run_mmlu(tiny, cfg, out, progress=False)
    full = open(out / "samples.jsonl").read().splitlines()
    # Simulate a crash: the last 5 records never written, the 6th-to-last half-written.
    kept = full[:-6]
    (out / "samples.jsonl").write_text("\n".join(kept) + "\n" + full[-6][:40])
    scored = []
    real = EngineBackend.loglikelihood
    monkeypatch.setattr(EngineBackend, "loglikelihood", lambda self, reqs, **kw: scored.extend(reqs) or real(self, reqs, **kw))
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


def test_run_dir_refuses_a_run_written_by_an_engine_of_other_numerics(tiny, tmp_path, monkeypatch):
    """Scores an engine of other numerics wrote (before a change that moves them) are not resumed
    into the same run: the folder is refused as another configuration's."""
    import evalsuite.backends.engine as engine_backend

    cfg = MMLUConfig(formulations=("letter",), **SMALL)
    monkeypatch.setattr(engine_backend, "NUMERICS_VERSION", engine_backend.NUMERICS_VERSION - 1)
    run_mmlu(tiny, cfg, tmp_path / "run", progress=False)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="different configuration"):
        run_mmlu(tiny, cfg, tmp_path / "run", progress=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["model"]["numerics"] == engine_backend.NUMERICS_VERSION - 1  # the record says which wrote it


@pytest.mark.parametrize("text,target,prediction,correct", [
    (" B", 1, 1, True),                 # the usual answer: a space, then the letter
    ("B", 2, 1, False),
    ("b", 1, None, False),              # lower case is not a letter answer (Model Optimizer's rule)
    ("", 0, None, False),               # nothing generated
    (" The answer is B", 1, None, False),  # starts with "T": neither a prediction nor correct
    ("\n\nA.", 0, 0, True),
    (" D) because", 3, 3, True),
])
def test_generative_outcome_hand_written(text, target, prediction, correct):
    assert generative_outcome(text, target) == (prediction, correct)


def test_generative_formulation_runs(tiny, tmp_path):
    res = run_mmlu(tiny, MMLUConfig(formulations=("generative",), **SMALL), tmp_path / "g", progress=False)
    records = [json.loads(line) for line in open(tmp_path / "g" / "samples.jsonl")]
    assert len(records) == 12 and all(1 <= len(r["generated_tokens"]) <= 2 for r in records)
    assert res.metrics["generative"]["n"] == 12
    # the recorded text is the decoding of the recorded tokens
    assert all(r["generated"] == tiny.tokenizer.decode(r["generated_tokens"], skip_special_tokens=True)
               for r in records)


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


def test_k_shot_run_uses_each_subjects_first_rows_as_exemplars(tiny, tmp_path, task, data):
    """A k-shot run: every prompt is lm-eval's context with the subject's first k rows (file
    order) as exemplars, and those rows are never scored."""
    import hashlib

    cfg = MMLUConfig(formulations=("letter",), num_fewshot=1, subjects=("abstract_algebra", "anatomy"), per_subject=3)
    run_mmlu(tiny, cfg, tmp_path / "k", progress=False)
    records = [json.loads(x) for x in open(tmp_path / "k" / "samples.jsonl")]
    assert len(records) == 6 and all(r["num_fewshot"] == 1 for r in records)
    by_subject = {}
    for q in data.questions:
        by_subject.setdefault(q.subject, []).append(q)
    questions = {q.id: q for q in data.questions}
    for r in records:
        q = questions[r["id"]]
        shots = by_subject[q.subject][:1]
        ref = _lm_eval_context(("default", "_default_template_yaml"), ("default", f"mmlu_{q.subject}.yaml"), q, shots,
                               lambda s: ["A", "B", "C", "D"])
        assert r["prompt_sha256"] == hashlib.sha256(ref.encode()).hexdigest()
        assert q.id not in {s.id for s in by_subject[q.subject][:5]}
