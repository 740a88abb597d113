"""lm-eval as a way in: the engine as lm-eval's model (`--model evalsuite`), the shipped offline
MMLU task YAMLs (tasks/lm_eval), and lm-eval's own `local-completions` model against
`evalsuite serve`; each agrees with the suite's own MMLU runner."""

from __future__ import annotations

import json
import math
import random

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from evalsuite.backends.engine import EngineBackend
from evalsuite.cli import main
from evalsuite.engine.generate import SamplingParams
from evalsuite.engine.load import load
from evalsuite.runners.lm_eval_model import EvalsuiteLM
from evalsuite.runners.mmlu import MMLUConfig, run_mmlu
from evalsuite.server.serve import BackgroundServer, served_model
from evalsuite.taskdef import TASKS_DIR
from evalsuite.textgen import generate_text

TASKS = ["evalsuite_mmlu_anatomy", "evalsuite_mmlu_marketing", "evalsuite_mmlu_continuation_anatomy",
         "evalsuite_mmlu_continuation_marketing"]
LIMIT = 4


@pytest.fixture(scope="module")
def runner_records(tiny, tmp_path_factory):
    """The runner on the first LIMIT rows of each subject (what lm-eval's --limit takes), given as
    a data file in the embedded schema; records keyed by formulation and question text."""
    from evalsuite.runners.mmlu import load_mmlu
    from evalsuite.taskdef import load_task

    out = tmp_path_factory.mktemp("runner")
    rows = []
    for subject in ("anatomy", "marketing"):
        qs = [q for q in load_mmlu(load_task("mmlu")).questions if q.subject == subject][:LIMIT]
        rows += [{"question": q.question, **{f"answer_{c}": q.choices[i] for i, c in enumerate("abcd")},
                  "correct_answer": "ABCD"[q.target], "topic": subject.replace("_", " ")} for q in qs]
    (out / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_mmlu(tiny, MMLUConfig(data=str(out / "data.jsonl")), out / "run", progress=False)
    records = map(json.loads, open(out / "run" / "samples.jsonl"))
    return {(r["formulation"], rows[int(r["id"].split("/")[1])]["question"]): r for r in records}


def _compare(results, runner_records) -> int:
    n = 0
    for task, samples in results["samples"].items():
        form = "cloze" if "continuation" in task else "letter"
        assert len(samples) == LIMIT
        for s in samples:
            mine = runner_records[(form, s["doc"]["question"])]
            theirs = [r[0][0] for r in s["resps"]]
            assert theirs == pytest.approx(mine["logprobs"], abs=1e-4), (task, s["doc"]["id"])
            assert s["acc"] == float(mine["correct"])
            n += 1
    return n


def test_lm_eval_with_the_engine_agrees_with_the_runner(tiny, runner_records):
    model = EvalsuiteLM(backend=EngineBackend(tiny, max_batch_size=8))
    results = lm_eval.simple_evaluate(model=model, tasks=TASKS, limit=LIMIT, log_samples=True,
                                      task_manager=TaskManager(include_path=str(TASKS_DIR / "lm_eval"), include_defaults=False))
    assert _compare(results, runner_records) == len(TASKS) * LIMIT


def test_lm_eval_local_completions_against_the_server_agrees_with_the_runner(tiny, tiny_dir, runner_records):
    with BackgroundServer(served_model(tiny, {"name": "bf16"}, "tiny", max_len=512)) as srv:
        results = lm_eval.simple_evaluate(
            model="local-completions", tasks=TASKS, limit=LIMIT, log_samples=True,
            model_args={"base_url": f"{srv.base_url}/completions", "model": "tiny", "tokenizer": str(tiny_dir),
                        "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 2},
            task_manager=TaskManager(include_path=str(TASKS_DIR / "lm_eval"), include_defaults=False))
    assert _compare(results, runner_records) == len(TASKS) * LIMIT


def test_lm_eval_command_line_runs_offline_with_the_engine(tiny_dir, tmp_path, capsys):
    argv = ["lm-eval", "--model", "evalsuite", "--model_args", f"model={tiny_dir},dtype=float32",
            "--tasks", "evalsuite_mmlu_anatomy", "--limit", "2", "--output_path", str(tmp_path / "out")]
    assert main(argv) == 0
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert written and "evalsuite_mmlu_anatomy" in json.loads(written[0].read_text())["results"]


def _hf_logprob_of(hf, context: list[int], targets: list[int]) -> float:
    with torch.no_grad():
        logits = hf(torch.tensor([context + targets[:-1]])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return sum(float(lp[len(context) - 1 + i, t]) for i, t in enumerate(targets))


@pytest.mark.parametrize("max_length", [512, 8])
def test_rolling_loglikelihood_scores_every_token_once(tiny, hf_tiny, max_length):
    """With a long context, the rolling log-likelihood is transformers' log-likelihood of the whole
    text after the prefix token; with windows of 8 it is the sum over lm-eval's own disjoint
    windows, each scored by transformers, and covers every token exactly once."""
    from lm_eval import utils

    text = "The quick brown fox jumps over the lazy dog. " * 3
    model = EvalsuiteLM(backend=EngineBackend(tiny), max_length=max_length)
    (got,) = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    tokens = tiny.tokenizer.encode(text)
    windows = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(
        tokens, model.prefix_token_id, max_length, 1)))
    assert sum(len(pred) for _, pred in windows) == len(tokens)
    assert [t for _, pred in windows for t in pred] == tokens
    want = sum(_hf_logprob_of(hf_tiny, ctx, pred) for ctx, pred in windows)
    assert got == pytest.approx(want, abs=1e-3)
    if max_length == 512:
        assert got == pytest.approx(_hf_logprob_of(hf_tiny, [model.prefix_token_id], tokens), abs=1e-3)


def test_generate_until_takes_top_p_and_refuses_what_it_cannot_do(tiny):
    """A task's top_p is honoured (a tiny top_p at a high temperature writes the greedy text);
    settings the engine does not implement are refused unless neutral, or irrelevant because
    decoding is greedy; never silently ignored."""
    model = EvalsuiteLM(backend=EngineBackend(tiny))
    greedy = generate_text(tiny.model, tiny.tokenizer, ["The quick"], SamplingParams(max_new_tokens=20))[0].text

    def gen(**kw) -> str:
        return model.generate_until([Instance("generate_until", {}, ("The quick", {"max_gen_toks": 20, **kw}), 0)])[0]

    assert gen(do_sample=True, temperature=5.0, top_p=1e-6) == greedy
    assert gen(do_sample=False, top_k=50, top_p=0.9) == greedy  # sampling-only settings, greedy decoding
    assert gen(num_beams=1, repetition_penalty=1.0) == greedy  # neutral values
    with pytest.raises(ValueError, match="settings num_beams=4 are not implemented by the engine.*num_beams=1"):
        gen(num_beams=4)
    with pytest.raises(ValueError, match="settings top_k=50 are not implemented"):
        gen(do_sample=True, temperature=0.7, top_k=50)


def test_generate_until_stops_and_caps_tokens(tiny):
    model = EvalsuiteLM(backend=EngineBackend(tiny))
    free = generate_text(tiny.model, tiny.tokenizer, ["The quick"], SamplingParams(max_new_tokens=20))[0].text
    stop = free[3:5]
    reqs = [Instance("generate_until", {}, ("The quick", {"until": [stop], "max_gen_toks": 20}), 0),
            Instance("generate_until", {}, ("The quick", {"until": [], "max_gen_toks": 3}), 1)]
    cut, short = model.generate_until(reqs)
    assert cut == free[:free.find(stop)]
    assert short == generate_text(tiny.model, tiny.tokenizer, ["The quick"], SamplingParams(max_new_tokens=3))[0].text


def test_harness_run_writes_the_suites_records(tiny_dir, tmp_path, capsys):
    out = tmp_path / "h"
    argv = ["run", "--harness", "lm-eval", "--task", "evalsuite_mmlu_continuation_anatomy", "--limit", "3",
            "--model", str(tiny_dir), "--dtype", "float32", "--output", str(out)]
    assert main(argv) == 0
    assert "evalsuite_mmlu_continuation_anatomy: acc" in capsys.readouterr().out
    records = [json.loads(x) for x in open(out / "samples.jsonl")]
    assert [r["id"] for r in records] == [f"evalsuite_mmlu_continuation_anatomy/{i}" for i in range(3)]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["recipe"]["name"] == "bf16"
    assert run["metrics"]["evalsuite_mmlu_continuation_anatomy"]["acc,none"] == \
        sum(r["acc"] for r in records) / 3
    # a rerun answers from lm-eval's cache in the run folder and adds no record
    assert main(argv) == 0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3
    # the run index lists it with its headline metric
    capsys.readouterr()
    assert main(["runs", "--task", "lm-eval"]) == 0
    acc = run["metrics"]["evalsuite_mmlu_continuation_anatomy"]["acc,none"]
    assert f"evalsuite_mmlu_continuation_anatomy acc {acc:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize("extra, msg", [
    (["--limit", "0"], "--limit 0; valid: a number of documents >= 1, or a fraction in (0, 1)"),
    (["--num-fewshot", "-1"], "--num-fewshot -1; valid: an integer >= 0"),
    (["--include-path", "/nonexistent"], "--include-path '/nonexistent': not a folder"),
    (["--task", "no_such_task_xyz"], "unknown lm-eval tasks ['no_such_task_xyz']"),
    (["--task", "evalsuite_mmlu_anatomyy,evalsuite_mmlu"],
     "unknown lm-eval tasks ['evalsuite_mmlu_anatomyy'] ('evalsuite_mmlu_anatomyy': did you mean "
     "'evalsuite_mmlu_anatomy', 'evalsuite_mmlu_astronomy'"),
])
def test_harness_arguments_are_checked_before_a_model_loads(extra, msg, capsys, monkeypatch):
    import evalsuite.models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(evalsuite.models, "load_model_and_recipe", no_load)
    assert main(["run", "--harness", "lm-eval", "--task", "evalsuite_mmlu_anatomy", *extra]) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback applies where there is no GPU")
def test_lm_eval_default_cuda_device_falls_back_where_there_is_no_gpu():
    """lm-eval passes its default device (cuda:0) whether or not a GPU exists; its hf model then
    uses the default device, and so does the engine. Plain cuda, which lm-eval's hf model takes as
    asked, is an error here as there; so is a device that is not a device."""
    from evalsuite.runners.lm_eval_model import _device

    assert [_device(d) for d in ("cuda:0", "cuda:1", "cuda", None, "cpu")] == [None, None, "cuda", None, "cpu"]
    with pytest.raises(ValueError, match="no CUDA device is available here"):
        EvalsuiteLM(model="smollm2-135m", device="cuda")
    with pytest.raises(ValueError, match="not a device"):
        EvalsuiteLM(model="smollm2-135m", device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("where", [["--device", "cuda"], ["--device=cuda:0"], []])
def test_lm_eval_command_refuses_a_named_device_that_is_not_here(where, monkeypatch, capsys):
    """A device the user names on ``evalsuite lm-eval`` (its --device, or device= in model_args)
    must exist: the command stops before lm-eval loads a task or a model."""
    import lm_eval.__main__

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: pytest.fail("lm-eval started"))
    model_args = "model=smollm2-135m" + ("" if where else ",device=cuda")
    argv = ["lm-eval", "--model", "evalsuite", "--model_args", model_args, "--tasks", "evalsuite_mmlu", *where]
    assert main(argv) == 2
    assert "no CUDA device is available here" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_harness_refuses_a_device_that_is_not_here_before_building_tasks(capsys, monkeypatch):
    import evalsuite.runners.lm_eval_harness

    monkeypatch.setattr(evalsuite.runners.lm_eval_harness, "task_manager",
                        lambda *a, **k: pytest.fail("lm-eval's tasks were built"))
    assert main(["run", "--harness", "lm-eval", "--task", "evalsuite_mmlu_anatomy", "--device", "cuda"]) == 2
    assert "--device 'cuda': no CUDA device is available here" in capsys.readouterr().err


# lm-eval task files of three shapes beside the shipped MMLU ones: a generative task with two
# filters, a rolling log-likelihood (perplexity) task, and a group that weighs its two
# multiple-choice subtasks (of 40 and 15 questions) equally. DATA and MC are replaced by the
# paths of JSON-lines files.
_TASK_FILES = {
    "tgen.yaml": """task: tgen
dataset_path: json
dataset_kwargs: {data_files: DATA}
test_split: train
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 4, do_sample: false}
metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
filter_list:
  - {name: strict, filter: [{function: take_first}]}
  - {name: digits, filter: [{function: regex, regex_pattern: "(\\\\d+)"}, {function: take_first}]}
""",
    "tppl.yaml": """task: tppl
dataset_path: json
dataset_kwargs: {data_files: DATA}
test_split: train
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]
""",
    "tgroup.yaml": """group: tgroup
task: [tmc_a, tmc_b]
aggregate_metric_list: [{metric: acc, weight_by_size: false}]
""",
    **{f"tmc_{x}.yaml": f"""task: tmc_{x}
dataset_path: json
dataset_kwargs: {{data_files: MC}}
test_split: train
{"process_docs: !function utils.last_fifteen" if x == "b" else ""}
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: ["1", "2", "4", "8"]
doc_to_target: gold
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
""" for x in "ab"},
    "utils.py": "def last_fifteen(ds):\n    return ds.select(range(25, 40))\n",
}
_MC = [{"question": f"Q: {i} plus {i} is", "gold": g}
       for i, g in enumerate(random.Random(0).choices(range(4), k=40))]
_DOCS = [{"question": f"Q: {i} plus {i} is", "answer": str(2 * i), "text": text} for i, text in enumerate([
    "The river ran past the old mill and the town slept.", "A small bird sang on the wire while rain fell.",
    "Bread rose in the warm kitchen as the clock ticked on.", "Ships came in at dawn with nets full of fish.",
    "The library opened late and closed early on Sundays.", "Snow covered the hills and the roads were quiet."], 1)]


def test_lm_eval_runs_of_two_models_compare_document_by_document(tiny_dir, tmp_path, capsys):
    """A run from the command line and one of the same model with noise added to its weights (a
    candidate whose answers move), on lm-eval tasks of every shape the comparator pairs: each
    filter's documents are kept (records per document and filter), a metric's value is lm-eval's
    own, and the paired gain is the one computed here from lm-eval's per-document numbers
    (accuracy differences averaged per subtask, then over the group's two subtasks as its config
    says; perplexity on the log scale). bits_per_byte has no paired form and is left out."""
    from evalsuite.compare import Tolerance, compare_sides, side_from_run
    from evalsuite.runners.lm_eval_harness import run_lm_eval

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in _DOCS))
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in _MC))
    for name, text in _TASK_FILES.items():
        text = text.replace("DATA", str(tmp_path / "docs.jsonl")).replace("MC", str(tmp_path / "mc.jsonl"))
        (tasks / name).write_text(text)
    runs = {"base": tmp_path / "base", "noisy": tmp_path / "noisy"}
    assert main(["run", "--harness", "lm-eval", "--task", "tgen", "--task", "tppl", "--task", "tgroup",
                 "--include-path", str(tasks), "--model", str(tiny_dir), "--dtype", "float32",
                 "--output", str(runs["base"])]) == 0
    assert "tgen: exact_match,strict" in capsys.readouterr().out
    noisy = load(str(tiny_dir), "float32")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in noisy.model.parameters():
            w.add_(torch.randn(w.shape, generator=gen) * w.std())
    run_lm_eval(EngineBackend(noisy, {"name": "noisy"}), ["tgen", "tppl", "tgroup"], runs["noisy"],
                include_path=str(tasks))
    records = {r: [json.loads(x) for x in open(runs[r] / "samples.jsonl")] for r in runs}
    assert sorted(x["id"] for x in records["base"] if x["task"] == "tgen") == sorted(
        f"tgen/{i}/{f}" for i in range(6) for f in ("digits", "strict"))

    base, cand = side_from_run(runs["base"]), side_from_run(runs["noisy"])
    assert sorted(base.metrics) == ["lm-eval.tgen.exact_match,digits", "lm-eval.tgen.exact_match,strict",
                                    "lm-eval.tgroup.acc", "lm-eval.tppl.byte_perplexity",
                                    "lm-eval.tppl.word_perplexity"]
    reported = {r: json.loads((runs[r] / "run.json").read_text())["metrics"] for r in runs}
    for side, r in ((base, "base"), (cand, "noisy")):
        assert side.metrics["lm-eval.tgroup.acc"].value == reported[r]["tgroup"]["acc,none"]
        assert side.metrics["lm-eval.tppl.word_perplexity"].value == reported[r]["tppl"]["word_perplexity,none"]
        assert all(m.items is not None for m in side.metrics.values())
    (result,) = compare_sides(base, [cand], {}, Tolerance(0.05))
    gains = {c.metric: c.gain for c in result.comparisons}

    def accuracy(r: str, task: str) -> dict[int, float]:
        return {x["doc_id"]: x["acc"] for x in records[r] if x["task"] == task}

    per_subtask = []
    for task in ("tmc_a", "tmc_b"):
        b, c = accuracy("base", task), accuracy("noisy", task)
        per_subtask.append(sum(c[d] - b[d] for d in b) / len(b))
    pooled = sum(n * g for n, g in zip((40, 15), per_subtask)) / 55
    assert per_subtask[0] != per_subtask[1] and sum(per_subtask) / 2 != pooled  # the weighting matters here
    assert gains["lm-eval.tgroup.acc"] == pytest.approx(sum(per_subtask) / 2, abs=1e-12)
    assert gains["lm-eval.tgroup.acc"] == pytest.approx(
        reported["noisy"]["tgroup"]["acc,none"] - reported["base"]["tgroup"]["acc,none"], abs=1e-12)
    ppl = {r: reported[r]["tppl"]["word_perplexity,none"] for r in runs}
    assert gains["lm-eval.tppl.word_perplexity"] == pytest.approx(-math.log(ppl["noisy"] / ppl["base"]), rel=1e-9)


def test_builtin_tasks_come_from_a_cached_index_equal_to_lm_evals_own(tmp_path, monkeypatch):
    """lm-eval's index of its ~14,000 built-in tasks takes 12-15 s to build. It is built once and
    kept; later calls read it and index only ours. The manager made from it is the one lm-eval
    builds itself: every entry (kind, file, parsed YAML, tags), ours over built-in names, and the
    same task, group and tag lists. An unknown name is refused with the closest names."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import TaskIndex

    from evalsuite.runners import lm_eval_harness
    from evalsuite.taskdef import TASKS_DIR

    monkeypatch.setenv("EVALSUITE_CACHE", str(tmp_path / "cache"))
    builds = []
    real_build = TaskIndex.__dict__["build"]  # the staticmethod itself
    monkeypatch.setattr(TaskIndex, "build", staticmethod(lambda paths, **k: builds.append(list(paths)) or
                                                         real_build.__func__(paths, **k)))
    ours = tmp_path / "ours"  # an include path whose task shadows a built-in name
    ours.mkdir()
    (ours / "arc_easy.yaml").write_text(_TASK_FILES["tmc_a.yaml"].replace("tmc_a", "arc_easy"))
    for _ in range(2):
        with pytest.raises(KeyError, match="'hellaswg': did you mean 'hellaswag'"):
            lm_eval_harness.task_manager(["hellaswg", "evalsuite_mmlu"])
        fast = lm_eval_harness.task_manager(["mmlu", "arc_easy"], str(ours))
    builtin_builds = [p for p in builds if any(str(x).endswith("lm_eval/tasks") for x in p)]
    assert len(builtin_builds) == 1  # once, then from the cache
    with monkeypatch.context() as m:  # a misspelt name is refused from the names alone
        m.setattr(lm_eval_harness, "_builtin_index", lambda path: pytest.fail("the whole index was read"))
        with pytest.raises(KeyError, match="'arc_esay': did you mean 'arc_easy'"):
            lm_eval_harness.task_manager(["arc_esay"])
    monkeypatch.setattr(TaskIndex, "build", real_build)
    full = TaskManager(include_path=[str(TASKS_DIR / "lm_eval"), str(ours)])
    assert fast.task_index == full.task_index and len(full.task_index) > 10_000
    assert fast.task_index["arc_easy"].yaml_path == ours / "arc_easy.yaml"
    for names in ("all_tasks", "all_subtasks", "all_groups", "all_tags"):
        assert getattr(fast, names) == getattr(full, names), names


def test_an_edited_task_file_or_changed_data_is_not_resumed_into_old_records(tiny_dir, tmp_path, capsys):
    """The run identity holds the task files (an edited YAML is another run, refused in the same
    folder), and a rerun whose documents differ from the recorded ones (the data file changed)
    is refused before it appends a record."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in _MC[:4]))
    yaml = _TASK_FILES["tmc_a.yaml"].replace("MC", str(data))
    (tasks / "tmc_a.yaml").write_text(yaml)
    out = tmp_path / "run"
    argv = ["run", "--harness", "lm-eval", "--task", "tmc_a", "--include-path", str(tasks),
            "--model", str(tiny_dir), "--dtype", "float32", "--output", str(out)]
    assert main(argv) == 0
    assert main(argv) == 0  # unchanged: resumes, adds nothing
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4
    capsys.readouterr()
    (tasks / "tmc_a.yaml").write_text(yaml.replace('doc_to_text: "{{question}}"', 'doc_to_text: "{{question}}?"'))
    assert main(argv) == 2
    assert "holds a run with a different configuration" in capsys.readouterr().err
    (tasks / "tmc_a.yaml").write_text(yaml)
    data.write_text("".join(json.dumps({**d, "question": d["question"] + " about"}) + "\n" for d in _MC[:4]))
    assert main(argv) == 2
    assert "4 documents differ from the ones recorded there (first: tmc_a/0)" in capsys.readouterr().err
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4


def test_a_task_whose_data_cannot_be_loaded_is_an_error_naming_it(tiny_dir, tmp_path, capsys, monkeypatch):
    """lm-eval raises whatever the datasets library does (here a missing data file; offline, the
    hub unreachable): one line naming the task and the cause, exit 2, not a traceback, and
    before the model loads."""
    from evalsuite import models

    monkeypatch.setattr(models, "load_model_and_recipe", lambda *a, **k: pytest.fail("the model loaded first"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tmc_a.yaml").write_text(_TASK_FILES["tmc_a.yaml"].replace("MC", str(tmp_path / "gone.jsonl")))
    argv = ["run", "--harness", "lm-eval", "--task", "tmc_a", "--include-path", str(tasks),
            "--model", str(tiny_dir), "--dtype", "float32", "--output", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "evalsuite: error: lm-eval could not load the tasks ['tmc_a']: FileNotFoundError" in err
    assert "gone.jsonl" in err.splitlines()[-1]  # the last line: no traceback of the datasets library after it
    assert "site-packages/datasets" not in err


def _bos_tokenizer(template: str | None = None):
    """The tiny tokenizer made Llama-like: it adds a BOS (the tiny model's bos_token_id, 0) to every
    string, and optionally has a chat template that begins with it, as Llama 3's does."""
    from tokenizers.processors import TemplateProcessing

    from .conftest import CHAT_TEMPLATE, make_tokenizer

    tok = make_tokenizer()
    tok.bos_token = "<eos>"
    tok._tokenizer.post_processor = TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 0)])
    tok.chat_template = template or "{{ bos_token }}" + CHAT_TEMPLATE
    return tok


def test_a_rendered_chat_template_gets_one_bos_as_with_lm_evals_hf_model(hf_tiny, tiny):
    """lm-eval's --apply_chat_template sends prompts as text that already begins with the BOS
    token; a tokenizer that adds one must not add a second. The engine's encoding of such text
    (lm-eval model, generation, the server's completions) equals lm-eval's hf model's."""
    import dataclasses

    from lm_eval.models.huggingface import HFLM

    from evalsuite.textgen import encode_prompt

    tok = _bos_tokenizer()
    ref = HFLM(pretrained=hf_tiny, tokenizer=tok)
    ours = EvalsuiteLM(backend=EngineBackend(dataclasses.replace(tiny, tokenizer=tok)))
    chat = ours.apply_chat_template([{"role": "user", "content": "2 plus 2 is"}])
    assert chat.startswith("<eos><|user|>")
    for text in ("2 plus 2 is", chat):
        want = ref.tok_encode(text)
        assert want.count(0) == 1 and want[0] == 0
        assert ours.tok_encode(text) == want == encode_prompt(tok, text)


def test_harness_chat_template_agrees_with_lm_evals_hf_model(tiny_chat_dir, tmp_path, capsys):
    """`run --harness lm-eval --apply-chat-template --fewshot-as-multiturn --system-instruction`
    gives each document the log-likelihoods lm-eval's own hf model gives with the same options
    (transformers' forward, float32), and is a run of its own beside the plain one."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer, LlamaForCausalLM

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in _MC[:6]))
    (tasks / "tmc_a.yaml").write_text(_TASK_FILES["tmc_a.yaml"].replace("MC", str(data)))
    chat = ["--apply-chat-template", "--fewshot-as-multiturn", "--system-instruction", "Answer with a number."]
    argv = ["run", "--harness", "lm-eval", "--task", "tmc_a", "--include-path", str(tasks), "--num-fewshot", "2",
            "--limit", "3", "--model", str(tiny_chat_dir), "--dtype", "float32"]
    assert main(argv + chat + ["--output", str(tmp_path / "chat")]) == 0
    ours = {json.loads(x)["doc_id"]: json.loads(x) for x in open(tmp_path / "chat" / "samples.jsonl")}
    assert all(r["arguments"][0][0].startswith("<|system|>Answer with a number.\n<|user|>") for r in ours.values())

    hf = LlamaForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    ref = HFLM(pretrained=hf, tokenizer=AutoTokenizer.from_pretrained(tiny_chat_dir), batch_size=4)
    results = lm_eval.simple_evaluate(
        model=ref, tasks=["tmc_a"], num_fewshot=2, limit=3, log_samples=True, apply_chat_template=True,
        fewshot_as_multiturn=True, system_instruction="Answer with a number.", random_seed=1234,
        numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    theirs = {s["doc_id"]: s for s in results["samples"]["tmc_a"]}
    assert sorted(theirs) == sorted(ours) == [0, 1, 2]
    for d, s in theirs.items():
        assert ours[d]["arguments"] == json.loads(json.dumps(s["arguments"], default=str))
        assert [r[0][0] for r in ours[d]["resps"]] == pytest.approx([float(r[0][0]) for r in s["resps"]], abs=1e-4)
    # the plain run is another run: the chat options are part of the identity
    capsys.readouterr()
    assert main(argv + ["--output", str(tmp_path / "chat")]) == 2
    assert "holds a run with a different configuration" in capsys.readouterr().err


@pytest.mark.parametrize("extra, msg", [
    (["--gen-kwargs", "temperature"], "--gen-kwargs 'temperature'; valid: KEY=VALUE pairs separated by commas"),
    (["--fewshot-as-multiturn"], "--fewshot-as-multiturn needs --apply-chat-template"),
    (["--apply-chat-template"], "--apply-chat-template: the tokenizer of"),
])
def test_harness_chat_options_are_checked_before_a_model_loads(extra, msg, tiny_dir, capsys, monkeypatch):
    import evalsuite.models

    monkeypatch.setattr(evalsuite.models, "load_model_and_recipe", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["run", "--harness", "lm-eval", "--task", "evalsuite_mmlu_anatomy", "--model", str(tiny_dir),
                 *extra]) == 2
    assert msg in capsys.readouterr().err


def test_harness_gen_kwargs_reach_the_tasks_requests(tiny_dir, tmp_path, capsys):
    """--gen-kwargs (lm-eval's form) is laid over the task's own generation settings, as lm-eval's
    --gen_kwargs is, and is part of the run's identity."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in _DOCS[:3]))
    (tasks / "tgen.yaml").write_text(_TASK_FILES["tgen.yaml"].replace("DATA", str(data)))
    argv = ["run", "--harness", "lm-eval", "--task", "tgen", "--include-path", str(tasks), "--model", str(tiny_dir),
            "--dtype", "float32", "--output", str(tmp_path / "run")]
    assert main(argv + ["--gen-kwargs", "max_gen_toks=2,until=Q"]) == 0
    records = [json.loads(x) for x in open(tmp_path / "run" / "samples.jsonl")]
    assert all(r["arguments"][0][1] == {"until": "Q", "max_gen_toks": 2, "do_sample": False} for r in records)
    capsys.readouterr()
    assert main(argv) == 2  # the task's own settings: another run
    assert "holds a run with a different configuration" in capsys.readouterr().err
