"""MMLU in three formulations: letter (lm-eval `mmlu`), cloze (lm-eval `mmlu_continuation`) and
generative (Model Optimizer's llm_eval). Prompts and choices come from tasks/mmlu.yaml.

Tokenization follows lm-eval's ``_encode_pair``: context and context+continuation are encoded
whole and the continuation is what the longer encoding adds, so " A" is scored as the token the
model would really produce after "Answer:" (a space-prefixed letter), not as a bare "A".
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends.base import Backend, Failure
from ..engine.requests import SamplingParams, ScoreRequest
from ..records import RunStore, package_versions
from ..stats import accuracy_table
from ..taskdef import Formulation, MultipleChoiceTask, load_task, parse_multiple_choice_task
from . import register
from .base import Job, Runner, RunResult, backend_identity, identity_hash, progress_bar

if TYPE_CHECKING:
    from ..engine.load import LoadedModel

LETTERS = ("A", "B", "C", "D")
DEFAULT_FORMULATIONS = ("letter", "cloze")  # `run mmlu` without --formulation
NEAR_TIE = 0.01  # log-probability margin under which batch-size noise may flip a prediction


@dataclass(frozen=True)
class Question:
    id: str
    subject: str  # lm-eval's key, e.g. "high_school_us_history"
    question: str
    choices: tuple[str, str, str, str]
    target: int


@dataclass
class MMLUData:
    questions: list[Question]  # every valid row, in file order
    rejected: list[dict[str, Any]]
    source: str
    sha256: str

    def subject_sizes(self) -> dict[str, int]:
        return dict(Counter(q.subject for q in self.questions))


@dataclass(frozen=True)
class MMLUConfig:
    """What an MMLU run scores; every field enters the run's identity. How fast it runs (batch
    sizes, concurrency) belongs to the backend and does not."""

    formulations: tuple[str, ...] = ("letter", "cloze")
    num_fewshot: int = 0
    per_subject: int | None = None  # stratified subset: this many questions per subject
    seed: int = 1234
    subjects: tuple[str, ...] | None = None
    data: str = "embedded"  # "embedded", a JSONL file (this schema or cais/mmlu's), or a hub id (cais/mmlu)

    def validate(self, task: MultipleChoiceTask) -> None:
        if not self.formulations:
            raise ValueError(f"no formulation given; valid: {', '.join(task.formulations)}")
        for f in self.formulations:
            task.formulation(f)
        for name, given in (("formulation", self.formulations), ("subject", self.subjects or ())):
            twice = sorted({g for g in given if given.count(g) > 1})
            if twice:  # the run's identity holds the list: the same run must not have two names
                raise ValueError(f"{name} {', '.join(map(repr, twice))} given more than once; give each once")
        if not 0 <= self.num_fewshot <= task.fewshot_pool:
            raise ValueError(f"num_fewshot={self.num_fewshot}; valid: 0..{task.fewshot_pool} "
                             "(exemplars come from each subject's first rows)")
        if self.per_subject is not None and self.per_subject < 1:
            raise ValueError(f"per_subject={self.per_subject}; give a positive count or omit it for all")
        if self.subjects:
            unknown = sorted(set(self.subjects) - set(task.categories))
            if unknown:
                raise ValueError(f"unknown subjects {unknown}; valid: {', '.join(sorted(task.categories))}")
        if self.data != "embedded" and not Path(self.data).is_file() and (
                Path(self.data).exists() or self.data.count("/") != 1):
            raise ValueError(f"data={self.data!r}; valid: 'embedded', an existing JSONL file, or a hub id "
                             "such as cais/mmlu")


# ---------------------------------------------------------------------------------------- data

def _subject_key(topic: str) -> str:
    return topic.strip().replace(" ", "_")


def parse_rows(rows: Sequence[dict[str, Any]], task: MultipleChoiceTask) -> tuple[list[Question], list[dict]]:
    """Rows in the embedded schema (question, answer_a..d, correct_answer A-D, topic) or in
    cais/mmlu's (question, choices: 4 answers, answer: 0-3, subject) to questions.

    Malformed rows are rejected with their row number and reason, never scored.
    """
    questions, rejected = [], []
    for row, r in enumerate(rows):
        r, reason = _embedded_schema(r)
        subject = _subject_key(str(r.get("topic", ""))) if r else ""
        answer = str(r.get("correct_answer", "")).strip() if r else ""
        if reason is None and answer not in LETTERS:
            reason = f"correct_answer={answer!r} is not one of A-D"
        elif reason is None and subject not in task.categories:
            reason = f"unknown subject {r.get('topic')!r}"
        elif reason is None and not str(r.get("question", "")).strip():
            reason = "empty question"
        if reason is not None:
            rejected.append({"row": row, "reason": reason})
            continue
        choices = tuple(str(r[f"answer_{c}"]) for c in "abcd")
        questions.append(Question(f"mmlu/{row}", subject, str(r["question"]), choices,  # type: ignore[arg-type]
                                  LETTERS.index(answer)))
    return questions, rejected


def _embedded_schema(r: Any) -> tuple[dict | None, str | None]:
    """A row as the embedded schema has it, or the reason it cannot be one."""
    if not isinstance(r, dict):
        return None, f"a row is a JSON object, not {type(r).__name__}"
    if "choices" not in r:
        return r, None
    choices, answer = r["choices"], r.get("answer")
    if not isinstance(choices, list) or len(choices) != 4:
        return None, f"choices={choices!r}; valid: a list of 4 answers"
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
        return None, f"answer={answer!r}; valid: the correct choice's index, 0-3"
    return {"question": r.get("question", ""), **{f"answer_{c}": choices[i] for i, c in enumerate("abcd")},
            "correct_answer": LETTERS[answer], "topic": r.get("subject", "")}, None


def load_mmlu(task: MultipleChoiceTask, source: str = "embedded") -> MMLUData:
    if source == "embedded":
        path = task.data.verified_path()
        return _from_jsonl(path, task, f"{task.data.package}=={task.data.version}:{task.data.path}",
                           task.data.sha256)
    if Path(source).is_file():
        path = Path(source)
        return _from_jsonl(path, task, str(path), hashlib.sha256(path.read_bytes()).hexdigest())
    return _from_hub(source, task)


def _from_jsonl(path: Path, task: MultipleChoiceTask, name: str, sha256: str) -> MMLUData:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"{path}:{n} is not valid JSON: {e}") from None
    questions, rejected = parse_rows(rows, task)
    return MMLUData(questions, rejected, name, sha256)


def _from_hub(repo: str, task: MultipleChoiceTask) -> MMLUData:
    """cais/mmlu through `datasets` (online only): the "all" config's test split."""
    try:
        import datasets

        ds = datasets.load_dataset(repo, "all", split="test")
    except Exception as e:
        raise ValueError(f"cannot load MMLU from {repo!r} ({type(e).__name__}: {e}); valid sources: "
                         "'embedded', a JSONL file (the embedded schema or cais/mmlu's), or a hub id such as cais/mmlu"
                         ) from None
    questions, rejected = parse_rows(list(ds), task)
    return MMLUData(questions, rejected, f"hf:{repo}@{ds._fingerprint}", ds._fingerprint)


def select(data: MMLUData, task: MultipleChoiceTask, cfg: MMLUConfig) -> tuple[dict[str, list[Question]], list[Question]]:
    """Few-shot exemplars per subject, and the questions to score (file order)."""
    by_subject: dict[str, list[Question]] = {}
    for q in data.questions:
        if cfg.subjects is None or q.subject in cfg.subjects:
            by_subject.setdefault(q.subject, []).append(q)
    exemplars, scored = {}, []
    for subject, qs in by_subject.items():
        pool, rest = qs[:task.fewshot_pool], qs[task.fewshot_pool:]
        exemplars[subject] = pool[:cfg.num_fewshot]
        if cfg.per_subject is not None:
            rng = random.Random(f"{cfg.seed}:{subject}")
            picked = set(q.id for q in rng.sample(rest, min(cfg.per_subject, len(rest))))
            scored.extend(q for q in rest if q.id in picked)
        elif cfg.num_fewshot:
            scored.extend(rest)
        else:
            scored.extend(qs)
    order = {q.id: i for i, q in enumerate(data.questions)}
    return exemplars, sorted(scored, key=lambda q: order[q.id])


# ------------------------------------------------------------------------------------- prompts

def render_question(form: Formulation, q: Question) -> str:
    text = q.question.strip() if form.strip_question else q.question
    a, b, c, d = q.choices
    return form.question.format(question=text, a=a, b=b, c=c, d=d)


def choice_texts(form: Formulation, q: Question) -> list[str]:
    return list(LETTERS) if form.choices == "letters" else list(q.choices)


def render_context(form: Formulation, q: Question, shots: Sequence[Question]) -> str:
    subject = q.subject.replace("_", " ")
    spaced = "".join(" " + w for w in q.subject.split("_"))
    parts = [form.description.format(subject=subject, subject_spaced=spaced)]
    for s in shots:
        answer = choice_texts(form, s)[s.target]
        parts.append(render_question(form, s) + form.target_delimiter + answer + form.fewshot_delimiter)
    return "".join(parts) + render_question(form, q)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context spaces move to the continuation; encode whole and context."""
    (ctx, cont), = encode_choices(tokenizer, context, [continuation])
    return ctx, cont


def encode_choices(tokenizer, context: str, continuations: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """``encode_pair`` for several continuations of one context, encoding the context once."""
    n_spaces = len(context) - len(context.rstrip())
    prefix = ""
    if n_spaces:
        context, prefix = context[:-n_spaces], context[-n_spaces:]
    ctx = tokenizer.encode(context)
    wholes = tokenizer([context + prefix + c for c in continuations])["input_ids"]
    return [(ctx, whole[len(ctx):]) for whole in wholes]


# ------------------------------------------------------------------------------------- running

def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class MMLUJob(Job):
    task: MultipleChoiceTask
    config: MMLUConfig
    data: MMLUData
    exemplars: dict[str, list[Question]]
    questions: list[Question]

    def identity(self) -> dict[str, Any]:
        return {"task": self.task.name, "config": asdict(self.config), "task_config_sha256": self.task.config_hash(),
                "data": {"source": self.data.source, "sha256": self.data.sha256,
                         "valid_rows": len(self.data.questions), "rejected_rows": len(self.data.rejected),
                         "rejected": self.data.rejected}}

    def slug(self) -> str:
        subset = f"n{self.config.per_subject}" if self.config.per_subject else "full"
        return f"{self.config.num_fewshot}shot-{subset}"


def prepare_mmlu(cfg: MMLUConfig, task: MultipleChoiceTask | None = None) -> MMLUJob:
    """Validate ``cfg``, load the data and choose the questions; errors before any model work."""
    task = task or load_task("mmlu")
    cfg.validate(task)
    data = load_mmlu(task, cfg.data)
    if not data.questions:
        raise ValueError(f"{data.source} holds no valid MMLU questions ({len(data.rejected)} rows rejected"
                         + (f", e.g. row {data.rejected[0]['row']}: {data.rejected[0]['reason']}" if data.rejected else "")
                         + "); expected JSONL rows with question, answer_a..answer_d, correct_answer (A-D), topic, "
                         "or cais/mmlu's question, choices (4), answer (0-3), subject")
    exemplars, questions = select(data, task, cfg)
    if not questions:
        raise ValueError(f"no question to score in {data.source} for subjects {list(cfg.subjects or [])} "
                         f"at {cfg.num_fewshot} shots (each subject's first {task.fewshot_pool} rows are exemplars)")
    return MMLUJob(task, cfg, data, exemplars, questions)


def _score_records(backend: Backend, form: Formulation, qs: list[Question],
                   exemplars: dict[str, list[Question]], num_fewshot: int) -> list[dict]:
    requests, spans, meta = [], [], []
    for q in qs:
        context = render_context(form, q, exemplars[q.subject])
        start = len(requests)
        texts = choice_texts(form, q)
        for ctx, cont in encode_choices(backend.tokenizer, context, [form.target_delimiter + t for t in texts]):
            requests.append(ScoreRequest(tuple(ctx), tuple(cont)))
        spans.append((start, len(requests)))
        meta.append((context, texts))
    results = backend.loglikelihood(requests)
    records = []
    for q, (a, b), (context, texts) in zip(qs, spans, meta):
        res = results[a:b]
        base = {"id": q.id, "subject": q.subject, "formulation": form.name, "num_fewshot": num_fewshot,
                "prompt_sha256": _sha(context)}
        failed = next((r for r in res if isinstance(r, Failure)), None)
        if failed is not None:
            records.append({**base, "failed": failed.reason})
            continue
        lps = [r.logprob for r in res]
        chars = [len(t) for t in texts]  # lm-eval's acc_norm divides by len(choice) in characters
        pred = max(range(4), key=lambda i: lps[i])
        pred_norm = max(range(4), key=lambda i: lps[i] / chars[i])
        top2 = sorted(lps, reverse=True)[:2]
        records.append({
            **base, "context_tokens": len(requests[a].context),
            "choices": texts, "logprobs": lps, "token_counts": [len(r.token_logprobs) for r in res],
            "char_counts": chars, "is_greedy": [r.is_greedy for r in res],
            "target": q.target, "prediction": pred, "correct": pred == q.target,
            "prediction_norm": pred_norm, "correct_norm": pred_norm == q.target,
            "margin": top2[0] - top2[1],
        })
    return records


def generative_outcome(text: str, target: int) -> tuple[int | None, bool]:
    """Model Optimizer's rule for a generated answer: the prediction is the letter the stripped
    text starts with (None if it starts with anything else), correct when that is the key's."""
    answer = text.strip()
    letter = answer[:1] if answer[:1] in LETTERS else None
    return (LETTERS.index(letter) if letter else None), answer.startswith(LETTERS[target])


def _generate_records(backend: Backend, form: Formulation, qs: list[Question],
                      exemplars: dict[str, list[Question]], num_fewshot: int) -> list[dict]:
    contexts = [render_context(form, q, exemplars[q.subject]) for q in qs]
    outs = backend.generate(contexts, SamplingParams(max_new_tokens=form.max_new_tokens))
    records = []
    for q, context, out in zip(qs, contexts, outs):
        base = {"id": q.id, "subject": q.subject, "formulation": form.name, "num_fewshot": num_fewshot,
                "prompt_sha256": _sha(context)}
        if isinstance(out, Failure):
            records.append({**base, "failed": out.reason})
            continue
        prediction, correct = generative_outcome(out.text, q.target)
        records.append({**base, "generated": out.text, "generated_tokens": out.tokens, "target": q.target,
                        "prediction": prediction, "correct": correct})
    return records


def _formulation_metrics(records: list[dict], failed: int, task: MultipleChoiceTask, sizes: dict[str, int]) -> dict:
    def table(key: str) -> dict:
        outcomes: dict[str, list[bool]] = {}
        for r in records:
            outcomes.setdefault(r["subject"], []).append(bool(r[key]))
        return accuracy_table(outcomes, task.categories, sizes)

    out: dict[str, Any] = {"n": len(records), "failed": failed}
    if not records:
        return out
    out["acc"] = table("correct")
    preds = Counter(r["prediction"] for r in records)
    out["prediction_share"] = {(LETTERS[k] if k is not None else "none"): v / len(records)
                               for k, v in sorted(preds.items(), key=lambda kv: (kv[0] is None, kv[0]))}
    if "margin" in records[0]:
        if records[0]["choices"] != list(LETTERS):  # single letters all have length 1: acc_norm == acc
            out["acc_norm"] = table("correct_norm")
        out["near_ties"] = sum(1 for r in records if r["margin"] <= NEAR_TIE)
        out["near_tie_margin"] = NEAR_TIE
    return out


def record_key(record: dict) -> tuple[str, str]:
    return record["formulation"], record["id"]


def run_mmlu(backend: Backend | LoadedModel, job: MMLUJob | MMLUConfig, out_dir: str | Path, *,
             recipe: dict[str, Any] | None = None, chunk_size: int = 512, progress: bool = True) -> RunResult:
    """Run (or resume) MMLU and write samples.jsonl + run.json to ``out_dir``.

    ``backend`` may be a loaded model (run in this process with ``recipe`` as its record);
    ``job`` a config, prepared here. Questions whose request failed are recorded with the reason
    and retried when the run is resumed; the metrics count them apart."""
    if not isinstance(backend, Backend):  # a LoadedModel: the engine is imported only then
        from ..backends.engine import EngineBackend

        backend = EngineBackend(backend, recipe)
    if isinstance(job, MMLUConfig):
        job = prepare_mmlu(job)
    task, cfg = job.task, job.config
    forms = [task.formulation(name) for name in cfg.formulations]
    if any(f.method == "loglikelihood" for f in forms):
        backend.check_loglikelihood()
    identity = {**job.identity(), **backend_identity(backend), "seed": cfg.seed, "questions": len(job.questions)}
    config_hash = identity_hash(identity, ("config", "task_config_sha256", "data", "model", "recipe"))
    store = RunStore(out_dir, identity, config_hash, key=record_key)
    store.run["backend"] = backend.describe()
    store.run["versions"] = package_versions()
    done = store.done_keys()
    timings = store.run.setdefault("timings", {})
    bar = progress_bar(progress, "q")
    for form in forms:
        pending = [q for q in job.questions if (form.name, q.id) not in done]
        if not pending:
            continue
        bar.reset(total=len(pending))
        bar.set_description(f"mmlu {form.name}")
        t0 = time.perf_counter()
        # Longest prompts first: batches of similar length waste little work.
        pending.sort(key=lambda q: len(q.question) + sum(map(len, q.choices)), reverse=True)
        make = _generate_records if form.method == "generate" else _score_records
        for i in range(0, len(pending), chunk_size):
            chunk = pending[i:i + chunk_size]
            store.append(make(backend, form, chunk, job.exemplars, cfg.num_fewshot))
            bar.update(len(chunk))
        timings[form.name] = timings.get(form.name, 0.0) + time.perf_counter() - t0
        store.write_run()
    bar.close()
    latest = store.latest()
    sizes = job.data.subject_sizes()
    metrics = {}
    for form in forms:
        mine = [latest[(form.name, q.id)] for q in job.questions if (form.name, q.id) in latest]
        ok = [r for r in mine if "failed" not in r]
        metrics[form.name] = _formulation_metrics(ok, len(mine) - len(ok), task, sizes)
    failed = sum(m["failed"] for m in metrics.values())
    store.finish(metrics=metrics, timings=timings, status="complete" if not failed else "incomplete",
                 usage=backend.usage())
    return RunResult(Path(out_dir), metrics, store.run)


# ------------------------------------------------------------------------------------- the runner

@register
class MMLURunner(Runner):
    name = "mmlu"

    def parse_task(self, raw: dict[str, Any], where: str) -> MultipleChoiceTask:
        return parse_multiple_choice_task(raw, where)

    def add_arguments(self, parser) -> None:
        parser.add_argument("--formulation", nargs="+", action="extend", default=None,
                            help="letter, cloze, generative (default: letter cloze)")
        parser.add_argument("--num-fewshot", type=int, default=0, help="exemplars per prompt, 0..5 (default 0)")
        parser.add_argument("--per-subject", type=int, default=None,
                            help="stratified subset: questions per subject (default: all 14,042)")
        parser.add_argument("--subjects", nargs="+", action="extend", default=None, help="restrict to these subjects")
        parser.add_argument("--seed", type=int, default=1234, help="seed of the subset draw")
        parser.add_argument("--data", default="embedded", help="'embedded', a JSONL file, or a hub id (cais/mmlu)")

    def prepare(self, task: MultipleChoiceTask, args) -> MMLUJob:
        cfg = MMLUConfig(formulations=tuple(args.formulation or DEFAULT_FORMULATIONS), num_fewshot=args.num_fewshot,
                         per_subject=args.per_subject, seed=args.seed,
                         subjects=tuple(args.subjects) if args.subjects else None, data=args.data)
        return prepare_mmlu(cfg, task)

    def run(self, job: MMLUJob, backend: Backend, out_dir: Path, *, progress: bool = True) -> RunResult:
        return run_mmlu(backend, job, out_dir, progress=progress)

    def summary(self, result: RunResult) -> str:
        return format_summary(result.metrics, result.run)


def format_summary(metrics: dict, run: dict) -> str:
    lines = [f"MMLU  {run['questions']} questions  ({run['data']['rejected_rows']} malformed rows rejected)"]
    for name, m in metrics.items():
        if m.get("failed"):
            lines.append(f"\n[{name}] {m['failed']} questions FAILED (see samples.jsonl; rerun the command to retry them)")
        if "acc" not in m:
            continue
        keys = ["acc"] + (["acc_norm"] if "acc_norm" in m else [])
        for key in keys:
            o = m[key]["overall"]
            lines.append(f"\n[{name}] {key}: {o['acc']:.4f} ± {_se(o['se'])}  (n={m['n']})")
            for cat, e in m[key]["categories"].items():
                lines.append(f"    {cat:<16} {e['acc']:.4f} ± {_se(e['se'])}  (n={e['n']})")
        share = ", ".join(f"{k} {v:.1%}" for k, v in m["prediction_share"].items())
        lines.append(f"    predictions: {share}")
        if "near_ties" in m:
            lines.append(f"    near ties (top-2 log-prob margin <= {m['near_tie_margin']}): {m['near_ties']}")
    lines.append("\nper-subject accuracy: see run.json -> metrics.<formulation>.acc.subjects")
    return "\n".join(lines)


def _se(se: float) -> str:
    return "n/a (1 question per subject)" if se != se else f"{se:.4f}"
