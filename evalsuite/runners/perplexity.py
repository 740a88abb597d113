"""Perplexity: rolling log-likelihood over real prose, per document, with intervals.

A document's log-likelihood is lm-eval's ``loglikelihood_rolling``: the text's tokens scored
from the model's prefix token (BOS, else EOS) in windows of at most ``max_length`` tokens, each
token exactly once (lm-eval's own ``get_rolling_token_windows`` and ``make_disjoint_window``
cut the windows). The metrics are lm-eval's wikitext metrics over the whole corpus,

    word_perplexity = exp(-sum LL / sum words)      (words: whitespace-separated)
    byte_perplexity = exp(-sum LL / sum UTF-8 bytes)
    bits_per_byte   = -sum LL / (sum bytes * ln 2)

plus token_perplexity (per token of the model's own tokenizer, so it compares recipes of one
model, not models). Each comes with a 95% interval over documents: the ratio estimator's
delta-method standard error, clustered by article (paragraphs of one article are not
independent), taken on the log scale and exponentiated.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..assets import Asset, file_sha256, read_utf8
from ..backends.base import Backend, Failure
from ..engine.requests import ScoreRequest
from ..records import RunStore, package_versions
from ..stats import ratio_estimate
from ..taskdef import TaskDefinitionError, fields_of, load_task
from . import register
from .base import Job, Runner, RunResult, backend_identity, identity_hash, progress_bar

Z95 = 1.959963984540054


@dataclass(frozen=True)
class PerplexityTask:
    runner: str
    name: str
    data: Asset
    max_length: int

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def describe(self) -> str:
        return f"rolling log-likelihood, windows of {self.max_length} tokens"


@dataclass(frozen=True)
class Document:
    id: str
    article: str
    text: str


@dataclass(frozen=True)
class PerplexityConfig:
    per_article: int | None = None  # the first N paragraphs of each article; None: all
    articles: tuple[str, ...] | None = None
    data: str = "embedded"  # or a UTF-8 text file, documents separated by blank lines
    max_length: int | None = None  # None: the task file's

    def validate(self) -> None:
        if self.per_article is not None and self.per_article < 1:
            raise ValueError(f"--per-article {self.per_article}: must be >= 1 (or omitted for every paragraph)")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"--max-length {self.max_length}: must be >= 2 tokens")
        twice = sorted({a for a in self.articles or () if self.articles.count(a) > 1})
        if twice:  # the run's identity holds the list: the same run must not have two names
            raise ValueError(f"--articles {twice}: given more than once; give each once")
        if self.data != "embedded" and not Path(self.data).is_file():
            raise ValueError(f"--data {self.data!r}: neither 'embedded' nor an existing text file")


def load_documents(task: PerplexityTask, source: str = "embedded") -> tuple[list[Document], str, str]:
    """(documents, source name, sha256). The embedded corpus is SQuAD-format JSON (articles of
    paragraphs); a text file holds documents separated by blank lines, each its own cluster."""
    if source == "embedded":
        path = task.data.verified_path()
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
        docs = [Document(f"{a:02d}-{p:03d}", art["title"], para["context"].strip())
                for a, art in enumerate(articles) for p, para in enumerate(art["paragraphs"])]
        return [d for d in docs if d.text], f"{task.data.package}=={task.data.version}:{task.data.path}", task.data.sha256
    path = Path(source)
    parts = [t.strip() for t in re.split(r"\n\s*\n", read_utf8(path, "--data"))]
    # no articles here: each document is its own cluster
    docs = [Document(f"{i:05d}", f"{path.name}#{i}", t) for i, t in enumerate(t for t in parts if t)]
    return docs, str(path), file_sha256(path)


def select_documents(docs: list[Document], cfg: PerplexityConfig) -> list[Document]:
    if cfg.articles:
        known = sorted({d.article for d in docs})
        unknown = sorted(set(cfg.articles) - set(known))
        if unknown:
            raise ValueError(f"--articles {unknown}: not in the corpus; valid: {', '.join(known)}")
        docs = [d for d in docs if d.article in cfg.articles]
    if cfg.per_article is not None:
        seen: dict[str, int] = {}
        kept = []
        for d in docs:
            seen[d.article] = seen.get(d.article, 0) + 1
            if seen[d.article] <= cfg.per_article:
                kept.append(d)
        docs = kept
    return docs


@dataclass
class PerplexityJob(Job):
    task: PerplexityTask
    config: PerplexityConfig
    documents: list[Document]
    source: str
    sha256: str

    @property
    def max_length(self) -> int:
        return self.config.max_length or self.task.max_length

    def identity(self) -> dict[str, Any]:
        return {"task": self.task.name, "config": {**asdict(self.config), "max_length": self.max_length},
                "task_config_sha256": self.task.config_hash(), "data": {"source": self.source, "sha256": self.sha256}}

    def slug(self) -> str:
        return f"n{self.config.per_article}" if self.config.per_article else "full"


def prepare_perplexity(cfg: PerplexityConfig, task: PerplexityTask | None = None) -> PerplexityJob:
    """Validate ``cfg`` and load the corpus; errors before any model work."""
    task = task or load_task("perplexity")
    cfg.validate()
    docs, source, sha = load_documents(task, cfg.data)
    docs = select_documents(docs, cfg)
    if not docs:
        raise ValueError(f"no document to score in {source} (a text file holds documents separated by blank lines)")
    return PerplexityJob(task, cfg, docs, source, sha)


def rolling_requests(tokens: list[int], prefix_token: int, max_length: int) -> list[ScoreRequest]:
    """lm-eval's rolling windows as (context, continuation) requests: every token of ``tokens``
    is a continuation token exactly once, with at most ``max_length`` tokens per forward."""
    from lm_eval import utils as lm_utils

    windows = lm_utils.get_rolling_token_windows(token_list=tokens, prefix_token=prefix_token,
                                                 max_seq_len=max_length, context_len=1)
    return [ScoreRequest(tuple(ctx), tuple(pred)) for ctx, pred in map(lm_utils.make_disjoint_window, windows)]


def prefix_token(tokenizer) -> int:
    """lm-eval's choice: the BOS token where the tokenizer has one, else EOS."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")
    return token


def _score_documents(backend: Backend, docs: list[Document], max_length: int) -> list[dict]:
    tok = backend.tokenizer
    prefix = prefix_token(tok)
    requests, spans = [], []
    for d in docs:
        ids = tok.encode(d.text, add_special_tokens=False)
        reqs = rolling_requests(ids, prefix, max_length)
        spans.append((len(requests), len(requests) + len(reqs), len(ids)))
        requests.extend(reqs)
    results = backend.loglikelihood(requests)
    records = []
    for d, (a, b, n_tokens) in zip(docs, spans):
        base = {"id": d.id, "article": d.article, "text_sha256": hashlib.sha256(d.text.encode()).hexdigest()}
        failed = next((r for r in results[a:b] if isinstance(r, Failure)), None)
        if failed is not None:
            records.append({**base, "failed": failed.reason})
            continue
        records.append({**base, "logprob": sum(r.logprob for r in results[a:b]), "tokens": n_tokens,
                        "words": len(re.split(r"\s+", d.text)), "bytes": len(d.text.encode("utf-8")),
                        "windows": b - a})
    return records


def perplexity_metrics(records: list[dict]) -> dict[str, Any]:
    """Corpus-level perplexities with 95% intervals over documents, clustered by article."""
    if not records:
        return {}
    nll = [-r["logprob"] for r in records]
    clusters = [r["article"] for r in records]
    out: dict[str, Any] = {"documents": len(records), "articles": len(set(clusters)),
                           "tokens": sum(r["tokens"] for r in records), "words": sum(r["words"] for r in records),
                           "bytes": sum(r["bytes"] for r in records)}
    for unit in ("word", "byte", "token"):
        est = ratio_estimate(nll, [r[unit + "s"] for r in records], clusters)
        out[f"{unit}_perplexity"] = {"value": math.exp(est.acc), "log": est.acc, "log_se": est.se,
                                     "ci95": [math.exp(est.acc - Z95 * est.se), math.exp(est.acc + Z95 * est.se)]}
    byte = out["byte_perplexity"]
    out["bits_per_byte"] = {"value": byte["log"] / math.log(2), "se": byte["log_se"] / math.log(2)}
    return out


def run_perplexity(backend: Backend, job: PerplexityJob, out_dir: str | Path, *, chunk_size: int = 64,
                   progress: bool = True) -> RunResult:
    """Run (or resume) the job; samples.jsonl holds one record per document."""
    backend.check_loglikelihood()
    # Windows never exceed what the model takes (lm-eval's hf model uses the model's length too).
    window = min(job.max_length, backend.longest_window() or job.max_length)
    identity = {**job.identity(), **backend_identity(backend), "window": window, "documents": len(job.documents)}
    config_hash = identity_hash(identity, ("config", "task_config_sha256", "data", "window", "model", "recipe"))
    store = RunStore(out_dir, identity, config_hash)
    store.run["backend"] = backend.describe()
    store.run["versions"] = package_versions()
    done = store.done_keys()
    pending = [d for d in job.documents if d.id not in done]
    timings = store.run.setdefault("timings", {})
    bar = progress_bar(progress, "doc")
    bar.reset(total=len(pending))
    bar.set_description("perplexity")
    t0 = time.perf_counter()
    for i in range(0, len(pending), chunk_size):
        chunk = pending[i:i + chunk_size]
        store.append(_score_documents(backend, chunk, window))
        bar.update(len(chunk))
    bar.close()
    timings["perplexity"] = timings.get("perplexity", 0.0) + time.perf_counter() - t0
    latest = store.latest()
    mine = [latest[d.id] for d in job.documents if d.id in latest]
    ok = [r for r in mine if "failed" not in r]
    metrics = {**perplexity_metrics(ok), "failed": len(mine) - len(ok)}
    store.finish(metrics=metrics, timings=timings, status="complete" if len(ok) == len(job.documents) else "incomplete",
                 usage=backend.usage())
    return RunResult(Path(out_dir), metrics, store.run)


def format_summary(metrics: dict, run: dict) -> str:
    lines = [f"perplexity  {run['documents']} documents  ({run['data']['source']}), windows of {run['window']} tokens"]
    if metrics.get("failed"):
        lines.append(f"{metrics['failed']} documents FAILED (see samples.jsonl; rerun the command to retry them)")
    if "word_perplexity" in metrics:
        lines.append(f"{metrics['tokens']} tokens, {metrics['words']} words, {metrics['articles']} articles; "
                     "95% intervals over documents, clustered by article")
        for unit in ("word", "byte", "token"):
            m = metrics[f"{unit}_perplexity"]
            lines.append(f"  {unit}_perplexity  {m['value']:.4f}  [{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]")
        b = metrics["bits_per_byte"]
        lines.append(f"  bits_per_byte    {b['value']:.4f} ± {b['se']:.4f}")
    return "\n".join(lines)


@register
class PerplexityRunner(Runner):
    name = "perplexity"

    def parse_task(self, raw: dict[str, Any], where: str) -> PerplexityTask:
        top = fields_of(PerplexityTask, raw, where)
        if not isinstance(top["max_length"], int) or top["max_length"] < 2:
            raise TaskDefinitionError(f"{where}: max_length = {top['max_length']!r}; an integer >= 2")
        return PerplexityTask(runner=top["runner"], name=top["name"],
                              data=Asset(**fields_of(Asset, top["data"], f"{where}: data")),
                              max_length=top["max_length"])

    def add_arguments(self, parser) -> None:
        parser.add_argument("--per-article", type=int, default=None,
                            help="the first N paragraphs of each of the 35 articles (default: all 1,204)")
        parser.add_argument("--articles", nargs="+", action="extend", default=None,
                            help="restrict to these article titles")
        parser.add_argument("--max-length", type=int, default=None,
                            help="tokens per scoring window (default: the task file's, 2048)")
        parser.add_argument("--data", default="embedded",
                            help="'embedded', or a UTF-8 text file with documents separated by blank lines")

    def prepare(self, task: PerplexityTask, args) -> PerplexityJob:
        cfg = PerplexityConfig(per_article=args.per_article, articles=tuple(args.articles) if args.articles else None,
                               data=args.data, max_length=args.max_length)
        return prepare_perplexity(cfg, task)

    def run(self, job: PerplexityJob, backend: Backend, out_dir: Path, *, progress: bool = True) -> RunResult:
        return run_perplexity(backend, job, out_dir, progress=progress)

    def summary(self, result: RunResult) -> str:
        return format_summary(result.metrics, result.run)
