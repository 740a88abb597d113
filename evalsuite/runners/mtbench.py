"""MT-Bench: two-turn answers from any backend, graded by an LLM judge through the OpenAI API.

Answers follow FastChat's conventions so scores compare with published ones: a temperature per
category (tasks/mt-bench.yaml; 0 is greedy), up to 1,024 new tokens, the model's chat template,
turn 2 seeing the model's own turn-1 answer, a seed per question and turn. Every question of a
turn goes to the backend in one call (in-flight batching on the engine and the server). The
judge (evalsuite.judge) grades each (question, turn) with FastChat's single prompts (reference
answers for math, reasoning and coding), or, in pairwise mode, against a baseline run's answers
in both orders (a win counts only when both orders agree).

Records (samples.jsonl) are answers per (question, turn) and judgments per (question, turn);
both are appended as they finish, so a killed run resumes with nothing lost or repeated. The
run folder also gets FastChat's own files: model_answer/<model>.jsonl and
model_judgment/<judge>_single.jsonl (or _pair.jsonl), which FastChat's show_result.py reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..assets import Asset
from ..backends.base import Backend, Failure
from ..engine.requests import SamplingParams
from ..judge import Judge, calibrate, render_pair, render_single
from ..reasoning import REASONING_PARSERS, needs_special_tokens, split_reasoning
from ..records import RunStore, package_versions
from ..stats import mean_estimate
from ..taskdef import TaskDefinitionError, fields_of, load_task
from . import register
from .base import Job, Runner, RunResult, backend_identity, identity_hash, progress_bar

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


@dataclass(frozen=True)
class MTBenchTask:
    runner: str
    name: str
    questions: Asset
    reference_answers: Asset
    temperatures: dict[str, float]
    max_new_tokens: int

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def describe(self) -> str:
        return f"80 two-turn questions, {len(self.temperatures)} categories, judged by an LLM"


@dataclass(frozen=True)
class MTBenchConfig:
    questions: int | None = None  # the first N per category... see select(); None: all 80
    categories: tuple[str, ...] | None = None
    max_new_tokens: int | None = None  # None: the task's 1,024
    seed: int = 0
    mode: str = "single"  # single | pairwise
    baseline: str | None = None  # a run folder with answers (pairwise; and the divergence)
    # a reasoning model's output: the answer is what follows its thinking (reasoning.split_reasoning);
    # the thinking is recorded beside it, never judged nor sent back in turn 2
    reasoning_parser: str | None = None

    def validate(self) -> None:
        if self.questions is not None and self.questions < 1:
            raise ValueError(f"--questions {self.questions}: must be >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: must be >= 1")
        if self.categories:
            bad = sorted(set(self.categories) - set(CATEGORIES))
            if bad:
                raise ValueError(f"--categories {bad}: unknown; valid: {', '.join(CATEGORIES)}")
            twice = sorted({c for c in self.categories if self.categories.count(c) > 1})
            if twice:  # the run's identity holds the list: the same run must not have two names
                raise ValueError(f"--categories {twice}: given more than once; give each once")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"--reasoning-parser {self.reasoning_parser!r}; valid: {', '.join(REASONING_PARSERS)}")
        if self.mode not in ("single", "pairwise"):
            raise ValueError(f"--mode {self.mode!r}; valid: single, pairwise")
        if self.mode == "pairwise" and not self.baseline:
            raise ValueError("--mode pairwise needs --baseline RUN (an mt-bench run folder whose answers are compared)")
        if self.baseline and not (Path(self.baseline) / "samples.jsonl").is_file():
            raise ValueError(f"--baseline {self.baseline!r}: not an mt-bench run folder (no samples.jsonl)")


def load_questions(task: MTBenchTask) -> tuple[list[dict], dict[int, list[str]]]:
    questions = [json.loads(line) for line in task.questions.verified_path().read_text().splitlines() if line]
    refs = {}
    for line in task.reference_answers.verified_path().read_text().splitlines():
        if line:
            r = json.loads(line)
            refs[r["question_id"]] = r["choices"][0]["turns"]
    return questions, refs


def select(questions: list[dict], cfg: MTBenchConfig) -> list[dict]:
    """``--categories`` keeps those; ``--questions N`` keeps N spread over the categories in turn
    (the first of each category, then the second, ...), so a small subset covers them all."""
    qs = [q for q in questions if not cfg.categories or q["category"] in cfg.categories]
    if cfg.questions is None:
        return qs
    by_cat: dict[str, list[dict]] = {}
    for q in qs:
        by_cat.setdefault(q["category"], []).append(q)
    picked: list[dict] = []
    rank = 0
    while len(picked) < min(cfg.questions, len(qs)):
        for cat in by_cat:
            if rank < len(by_cat[cat]) and len(picked) < cfg.questions:
                picked.append(by_cat[cat][rank])
        rank += 1
    return sorted(picked, key=lambda q: q["question_id"])


@dataclass
class MTBenchJob(Job):
    task: MTBenchTask
    config: MTBenchConfig
    questions: list[dict]
    references: dict[int, list[str]]
    all_questions: dict[int, dict]

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens or self.task.max_new_tokens

    def identity(self) -> dict[str, Any]:
        cfg = {**asdict(self.config), "max_new_tokens": self.max_new_tokens}
        cfg.pop("mode")  # judging settings do not change the answers (they are in judgment records)
        cfg.pop("baseline")
        if cfg["reasoning_parser"] is None:  # added later: absent where unset, so earlier runs resume
            cfg.pop("reasoning_parser")
        return {"task": self.task.name, "config": cfg, "task_config_sha256": self.task.config_hash(),
                "data": {"questions_sha256": self.task.questions.sha256,
                         "reference_answers_sha256": self.task.reference_answers.sha256}}

    def slug(self) -> str:
        return f"q{len(self.questions)}-t{self.max_new_tokens}"


def prepare_mtbench(cfg: MTBenchConfig, task: MTBenchTask | None = None) -> MTBenchJob:
    task = task or load_task("mt-bench")
    cfg.validate()
    questions, refs = load_questions(task)
    picked = select(questions, cfg)
    if not picked:
        raise ValueError(f"no MT-Bench question for categories {list(cfg.categories or [])}")
    available = sum(1 for q in questions if not cfg.categories or q["category"] in cfg.categories)
    if cfg.questions is not None and cfg.questions > available:
        raise ValueError(f"--questions {cfg.questions}: the selection holds {available} questions; "
                         f"valid: 1..{available} (or omit it for all)")
    return MTBenchJob(task, cfg, picked, refs, {q["question_id"]: q for q in questions})


def sampling_for(task: MTBenchTask, q: dict, turn: int, seed: int, max_new_tokens: int) -> SamplingParams:
    """FastChat's temperature for the question's category (0: greedy), and a seed of its own per
    question and turn, so the answer does not depend on what else is in the batch."""
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=float(task.temperatures[q["category"]]),
                          seed=seed * 1_000_003 + q["question_id"] * 10 + turn)


def conversation(q: dict, answers: list[str], turn: int) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": q["turns"][0]}]
    if turn == 2:
        msgs += [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": q["turns"][1]}]
    return msgs


def _key(r: dict) -> tuple:
    return (r["kind"], r["question_id"], r["turn"], r.get("judge_key", ""))


def _answers(latest: dict) -> dict[int, dict[int, str]]:
    out: dict[int, dict[int, str]] = {}
    for (kind, qid, turn, _), r in latest.items():
        if kind == "answer" and "failed" not in r:
            out.setdefault(qid, {})[turn] = r["text"]
    return out


def read_answers(run_dir: str | Path) -> dict[int, dict[int, str]]:
    """(question id -> turn -> text) from an mt-bench run folder."""
    store = [json.loads(line) for line in (Path(run_dir) / "samples.jsonl").read_text().splitlines() if line]
    return _answers({_key(r): r for r in store})


def generate_answers(backend: Backend, job: MTBenchJob, store: RunStore, bar) -> None:
    """Both turns, every question of a turn in one backend call; skips what is recorded."""
    for turn in (1, 2):
        answers = _answers(store.latest())
        todo = [q for q in job.questions if turn not in answers.get(q["question_id"], {})
                and (turn == 1 or 1 in answers.get(q["question_id"], {}))]
        if not todo:
            continue
        bar.set_description(f"mt-bench answers, turn {turn}")
        prompts = [conversation(q, [answers.get(q["question_id"], {}).get(1, "")], turn) for q in todo]
        params = [sampling_for(job.task, q, turn, job.config.seed, job.max_new_tokens) for q in todo]
        outs: list = [None] * len(todo)
        too_long = _too_long(backend, prompts)  # refused here as an endpoint would refuse them
        for i, reason in too_long.items():
            outs[i] = Failure(reason)
        fit = [i for i in range(len(todo)) if i not in too_long]
        for i, out in zip(fit, backend.generate([prompts[i] for i in fit], [params[i] for i in fit]) if fit else []):
            outs[i] = out
        now = time.time()
        recs = []
        for q, out in zip(todo, outs):
            base = {"kind": "answer", "question_id": q["question_id"], "turn": turn, "category": q["category"],
                    "temperature": float(job.task.temperatures[q["category"]])}
            if isinstance(out, Failure):
                recs.append({**base, "failed": out.reason})
                continue
            rec = {**base, "text": out.text, "new_tokens": len(out.tokens), "finish_reason": out.finish_reason,
                   "tstamp": now}
            split = _split_answer(out, job.config.reasoning_parser, backend.tokenizer)
            if split is not None:  # no answer when the thinking never ended: judged as the empty answer it is
                reasoning, answer = split
                rec.update(text=answer or "", reasoning=reasoning, answered=answer is not None)
            recs.append(rec)
        store.append(recs)
        bar.update(len(todo))


def _split_answer(out, parser: str | None, tokenizer) -> tuple[str, str | None] | None:
    """(thinking, answer) of a reasoning model's output, or None for another model's: split by
    ``parser`` (harmony's markers read from the engine's tokens), or by the endpoint (vLLM with a
    reasoning parser returns the thinking apart; an empty answer cut by the token budget was still
    thinking)."""
    if out.reasoning is not None:
        unfinished = not out.text.strip() and out.finish_reason == "length"
        return out.reasoning, None if unfinished else out.text
    if parser:
        text = out.text
        if needs_special_tokens(parser) and out.tokens and tokenizer is not None:
            text = tokenizer.decode(out.tokens, skip_special_tokens=False)
        return split_reasoning(text, parser)
    return None


def _too_long(backend: Backend, prompts: list) -> dict[int, str]:
    from ..textgen import encode_prompt

    limit = backend.context_length()
    if backend.tokenizer is None or not limit or backend.describe().get("kind") != "engine":
        return {}
    out = {}
    for i, p in enumerate(prompts):
        n = len(encode_prompt(backend.tokenizer, p, backend.chat_template_kwargs))
        if n >= limit:
            out[i] = f"the prompt has {n} tokens; the model's context is {limit}"
    return out


def judge_answers(judge: Judge, job: MTBenchJob, store: RunStore, bar, baseline: dict | None) -> None:
    from concurrent.futures import ThreadPoolExecutor

    answers = _answers(store.latest())
    done = store.done_keys()
    mode = job.config.mode
    jid = judge.identity
    jkey = hashlib.sha256(json.dumps([jid, mode], sort_keys=True).encode()).hexdigest()[:16]
    todo = []
    for q in job.questions:
        mine = answers.get(q["question_id"], {})
        for turn in (1, 2):
            if ("judgment", q["question_id"], turn, jkey) in done or any(t not in mine for t in range(1, turn + 1)):
                continue
            if mode == "pairwise" and not all(t in baseline.get(q["question_id"], {}) for t in range(1, turn + 1)):
                continue
            todo.append((q, turn))
    if not todo:
        return
    bar.set_description("mt-bench judging")
    bar.reset(total=len(todo))

    def one(item):
        q, turn = item
        qid = q["question_id"]
        ref = job.references.get(qid)
        prompt = judge.config.prompt_for(mode, q["category"], turn)
        mine = [answers[qid][t] for t in (1, 2) if t in answers[qid]]
        base = {"kind": "judgment", "question_id": qid, "turn": turn, "category": q["category"],
                "judge_key": jkey, "judge": jid, "judge_prompt": prompt["name"],
                "judge_config_sha256": judge.config.sha256,
                "answer_sha256": hashlib.sha256(json.dumps(mine[:turn]).encode()).hexdigest()}
        if mode == "single":
            msgs = render_single(prompt, q, mine, turn, ref)
            r = judge.grade(msgs)
            rec = {**base, "user_prompt": msgs[1]["content"], **{k: r.get(k) for k in (
                "judgment", "score", "unscored", "prob_score", "prob_mass", "prob_unscored")},
                "cached": bool(r.get("cached"))}
        else:
            theirs = [baseline[qid][t] for t in (1, 2) if t in baseline[qid]]
            g1 = judge.compare(render_pair(prompt, q, mine, theirs, turn, ref))  # candidate is A
            g2 = judge.compare(render_pair(prompt, q, theirs, mine, turn, ref))  # candidate is B
            if g1.get("failed") or g2.get("failed"):
                r = {"failed": g1.get("failed") or g2.get("failed")}
            else:
                r = {}
            m1 = {"A": "model_1", "B": "model_2"}
            m2 = {"A": "model_2", "B": "model_1"}
            rec = {**base, "g1_winner": m1.get(g1.get("winner"), g1.get("winner")),
                   "g2_winner": m2.get(g2.get("winner"), g2.get("winner")),
                   "g1_prob_winner": m1.get(g1.get("prob_winner"), g1.get("prob_winner")),
                   "g2_prob_winner": m2.get(g2.get("prob_winner"), g2.get("prob_winner")),
                   "g1_judgment": g1.get("judgment"), "g2_judgment": g2.get("judgment")}
        if r.get("failed"):
            rec["failed"] = r["failed"]
        rec["tstamp"] = time.time()
        return rec

    chunk = max(1, judge.backend.concurrency) * 4
    with ThreadPoolExecutor(max(1, judge.backend.concurrency)) as pool:
        for i in range(0, len(todo), chunk):
            recs = list(pool.map(one, todo[i:i + chunk]))
            store.append(recs)
            bar.update(len(recs))


# ------------------------------------------------------------------------------------ metrics

def _estimate(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"score": None, "se": None, "n": 0}
    e = mean_estimate(values)
    return {"score": e.acc, "se": e.se if e.se == e.se else None, "n": e.n}


def single_metrics(judgments: list[dict]) -> dict[str, Any]:
    """FastChat's show_result: the mean over scored (question, turn) pairs; also per turn and
    per category, with standard errors; unscored counted apart. The same for the
    probability-weighted rating, never mixed with the parsed one."""
    out: dict[str, Any] = {"judged": len(judgments)}
    for field_, name in (("score", "parsed"), ("prob_score", "probability")):
        scored = [j for j in judgments if j.get(field_) is not None]
        if not scored and not any(j.get("unscored" if field_ == "score" else "prob_unscored") for j in judgments):
            continue  # this rating was not asked for
        out[name] = {
            **_estimate([j[field_] for j in scored]),
            "unscored": len(judgments) - len(scored),
            "turns": {str(t): _estimate([j[field_] for j in scored if j["turn"] == t]) for t in (1, 2)},
            "categories": {c: _estimate([j[field_] for j in scored if j["category"] == c])
                           for c in CATEGORIES if any(j["category"] == c for j in judgments)}}
    return out


def pairwise_metrics(judgments: list[dict], field_prefix: str = "") -> dict[str, Any]:
    """FastChat's rule: a win only when both orders agree, otherwise a tie; errors dropped."""
    g1k, g2k = f"g1_{field_prefix}winner", f"g2_{field_prefix}winner"
    ok = [j for j in judgments if j.get(g1k) not in (None, "error") and j.get(g2k) not in (None, "error")]
    wins = sum(1 for j in ok if j[g1k] == j[g2k] == "model_1")
    losses = sum(1 for j in ok if j[g1k] == j[g2k] == "model_2")
    ties = len(ok) - wins - losses
    n = len(ok)
    return {"n": n, "errors": len(judgments) - n, "wins": wins, "ties": ties, "losses": losses,
            "win_rate": wins / n if n else None, "loss_rate": losses / n if n else None,
            "win_rate_adjusted": (wins + 0.5 * ties) / n if n else None,
            "position_consistency": sum(1 for j in ok if j[g1k] == j[g2k]) / n if n else None}


def write_fastchat_files(out_dir: Path, model_id: str, job: MTBenchJob, latest: dict, judge_name: str,
                         mode: str, baseline_id: str | None, extra: dict, judge_key: str,
                         probability: bool = False) -> dict[str, str]:
    """FastChat's model_answer and model_judgment JSONL files, from the records of this judge and
    mode. The judgment file holds the parsed ratings and verdicts, or, for a judge that rates by
    probability only, the probability-weighted ones (FastChat's layout has room for one)."""
    answers = _answers(latest)
    ans_path = out_dir / "model_answer" / f"{model_id}.jsonl"
    ans_path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for q in job.questions:
        turns = answers.get(q["question_id"], {})
        if 1 in turns and 2 in turns:
            answer_id = hashlib.sha256(f"{model_id}:{q['question_id']}:{turns[1]}:{turns[2]}".encode()).hexdigest()[:22]
            lines.append({"question_id": q["question_id"], "answer_id": answer_id, "model_id": model_id,
                          "choices": [{"index": 0, "turns": [turns[1], turns[2]]}],
                          "tstamp": max(r.get("tstamp", 0) for (k, qid, _, _), r in latest.items()
                                        if k == "answer" and qid == q["question_id"]), **extra})
    ans_path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    judgments = [r for (k, _, _, key), r in latest.items() if k == "judgment" and key == judge_key and "failed" not in r]
    score_field, g = ("prob_score", "prob_") if probability else ("score", "")
    jpath = out_dir / "model_judgment" / f"{judge_name}_{'single' if mode == 'single' else 'pair'}.jsonl"
    jpath.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for j in sorted(judgments, key=lambda r: (r["question_id"], r["turn"])):
        if mode == "single":  # FastChat writes -1 for a judgment without a rating
            rows.append({"question_id": j["question_id"], "model": model_id, "judge": [judge_name, j["judge_prompt"]],
                         "user_prompt": j["user_prompt"], "judgment": j["judgment"],
                         "score": j[score_field] if j.get(score_field) is not None else -1, "turn": j["turn"],
                         "tstamp": j["tstamp"]})
        else:
            rows.append({"question_id": j["question_id"], "model_1": model_id, "model_2": baseline_id,
                         "g1_winner": j[f"g1_{g}winner"] or "error", "g2_winner": j[f"g2_{g}winner"] or "error",
                         "judge": [judge_name, j["judge_prompt"]], "g1_judgment": j["g1_judgment"],
                         "g2_judgment": j["g2_judgment"], "turn": j["turn"], "tstamp": j["tstamp"]})
    jpath.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return {"answers": str(ans_path), "judgments": str(jpath)}


# ------------------------------------------------------------------------------------ the run

def run_mtbench(backend: Backend, job: MTBenchJob, out_dir: str | Path, judge: Judge, *, progress: bool = True,
                calibration_limit: int | None = None, divergence: dict | None = None) -> RunResult:
    out_dir = Path(out_dir)
    identity = {**job.identity(), **backend_identity(backend), "questions": len(job.questions)}
    config_hash = identity_hash(identity, ("config", "task_config_sha256", "data", "model", "recipe"))
    store = RunStore(out_dir, identity, config_hash, key=_key)
    store.run["backend"] = backend.describe()
    store.run["versions"] = package_versions()
    timings = store.run.setdefault("timings", {})
    bar = progress_bar(progress, "q")
    bar.reset(total=2 * len(job.questions))
    t0 = time.perf_counter()
    generate_answers(backend, job, store, bar)
    timings["answers"] = timings.get("answers", 0.0) + time.perf_counter() - t0
    store.write_run()
    baseline = read_answers(job.config.baseline) if job.config.baseline else None
    t0 = time.perf_counter()
    calls, billed = judge.calls, judge.backend.usage()
    judge_answers(judge, job, store, bar, baseline)
    timings["judging"] = timings.get("judging", 0.0) + time.perf_counter() - t0
    bar.close()
    t0 = time.perf_counter()
    calibration = calibrate(judge, job.all_questions, job.references, limit=calibration_limit)
    timings["calibration"] = time.perf_counter() - t0
    latest = store.latest()
    jid = judge.identity
    jkey = hashlib.sha256(json.dumps([jid, job.config.mode], sort_keys=True).encode()).hexdigest()[:16]
    mine = {(q["question_id"], t) for q in job.questions for t in (1, 2)}
    judgments = [r for (k, qid, t, key), r in latest.items() if k == "judgment" and key == jkey and (qid, t) in mine]
    failed_answers = [r for (k, qid, t, _), r in latest.items() if k == "answer" and "failed" in r and (qid, t) in mine]
    answers_failed = len(failed_answers)
    ok = [j for j in judgments if "failed" not in j]
    reasons = Counter(r["failed"] for r in failed_answers + [j for j in judgments if "failed" in j])
    usage = {k: v - billed[k] for k, v in judge.backend.usage().items()}  # judging and calibration
    metrics: dict[str, Any] = {"mode": job.config.mode, "judge": {**jid, "calls_this_session": judge.calls - calls,
                                                                   "usage_this_session": usage},
                               "judge_key": jkey,
                               "judge_calibration": calibration,
                               "answers_failed": answers_failed, "judgments_failed": len(judgments) - len(ok),
                               "failure_reasons": dict(reasons.most_common(3))}
    if job.config.mode == "single":
        metrics.update(single_metrics(ok))
    else:
        if judge.rating != "probability":
            metrics["pairwise"] = pairwise_metrics(ok)
        if any(j.get("g1_prob_winner") for j in ok):
            metrics["pairwise_probability"] = pairwise_metrics(ok, "prob_")
    if divergence is not None:
        metrics["divergence_from_baseline"] = divergence
    model_id = f"{(identity.get('model') or {}).get('name', 'model')}-{(identity.get('recipe') or {}).get('name', '')}"
    files = write_fastchat_files(out_dir, model_id.strip("-").replace("/", "_"), job, latest,
                                 jid["model"].replace("/", "_"), job.config.mode,
                                 Path(job.config.baseline).name if job.config.baseline else None,
                                 {"recipe": identity.get("recipe"), "backend": store.run["backend"]}, jkey,
                                 probability=judge.rating == "probability")
    complete = len(ok) == 2 * len(job.questions) and not answers_failed
    store.finish(metrics=metrics, timings=timings, fastchat_files=files,
                 status="complete" if complete else "incomplete", usage=backend.usage())
    return RunResult(out_dir, metrics, store.run)


def format_summary(metrics: dict, run: dict) -> str:
    judge = metrics["judge"]
    lines = [f"MT-Bench  {run['questions']} questions x 2 turns, {metrics['mode']} grading by {judge['model']} "
             f"(rating: {judge['rating']}; not a GPT-4-judged score unless the judge is GPT-4)"]
    for name in ("parsed", "probability"):
        m = metrics.get(name)
        if not m:
            continue
        lines.append(f"\n[{name} rating] score {_fmt(m)}  unscored {m['unscored']} of {metrics['judged']}")
        for t, e in m["turns"].items():
            lines.append(f"    turn {t}: {_fmt(e)}")
        for c, e in m["categories"].items():
            lines.append(f"    {c:<11} {_fmt(e)}")
    for name in ("pairwise", "pairwise_probability"):
        p = metrics.get(name)
        if p:
            lines.append(f"\n[{name}] vs baseline: wins {p['wins']}, ties {p['ties']}, losses {p['losses']} "
                         f"(errors {p['errors']}); adjusted win rate {_num(p['win_rate_adjusted'])}, "
                         f"position consistency {_num(p['position_consistency'])}")
    cal = metrics.get("judge_calibration") or {}
    for name in ("parsed", "probability"):
        c = cal.get(name)
        if c:
            flag = "" if c["discriminative"] else "  ** NOT DISCRIMINATIVE (AUC < 0.8): do not trust these scores **"
            lines.append(f"\njudge calibration ({name}, {cal['questions']} reference answers vs corrupted): "
                         f"AUC {_num(c['auc'])}, gap {_num(c['gap'])} (good {_num(c['good_mean'])}, corrupted "
                         f"{_num(c['bad_mean'])}){flag}")
    div = metrics.get("divergence_from_baseline")
    if div:
        lines.append(f"\njudge-free divergence from the baseline's answers ({div['tokens']} tokens, teacher forced): "
                     f"mean KL {div['mean_kl']:.5f}, greedy choice changed on {div['greedy_changed']:.2%} of tokens")
    if metrics.get("answers_failed") or metrics.get("judgments_failed"):
        lines.append(f"\nFAILED: {metrics['answers_failed']} answers, {metrics['judgments_failed']} judgments "
                     "(see samples.jsonl; rerun the command to retry them)")
        lines += [f"  {n} x {reason}" for reason, n in metrics.get("failure_reasons", {}).items()]
    usage = judge.get("usage_this_session")
    if usage:
        missing = usage["requests_without_usage"]
        unreported = f" ({missing} replies without usage)" if missing else ""
        lines.append(f"\njudge usage this session: {usage['requests']} requests, {usage['prompt_tokens']:,} prompt + "
                     f"{usage['completion_tokens']:,} completion tokens{unreported} (cached judgments cost none)")
    files = run.get("fastchat_files") or {}
    if files:
        lines.append(f"\nFastChat files: {files['answers']}, {files['judgments']}")
    return "\n".join(lines)


def _fmt(e: dict) -> str:
    if e.get("score") is None:
        return "n/a"
    return f"{e['score']:.3f} ± {e['se']:.3f} (n={e['n']})" if e.get("se") is not None else f"{e['score']:.3f} (n={e['n']})"


def _num(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


@register
class MTBenchRunner(Runner):
    name = "mt-bench"

    def parse_task(self, raw: dict[str, Any], where: str) -> MTBenchTask:
        top = fields_of(MTBenchTask, raw, where)
        temps = top["temperatures"]
        if set(temps) != set(CATEGORIES) or not all(isinstance(v, (int, float)) and v >= 0 for v in temps.values()):
            raise TaskDefinitionError(f"{where}: temperatures must give every category {list(CATEGORIES)} a value >= 0")
        return MTBenchTask(runner=top["runner"], name=top["name"],
                           questions=Asset(**fields_of(Asset, top["questions"], f"{where}: questions")),
                           reference_answers=Asset(**fields_of(Asset, top["reference_answers"],
                                                               f"{where}: reference_answers")),
                           temperatures={k: float(v) for k, v in temps.items()},
                           max_new_tokens=int(top["max_new_tokens"]))

    def add_arguments(self, parser) -> None:
        parser.add_argument("--questions", type=int, default=None,
                            help="a subset of N questions spread over the categories (default: all 80)")
        parser.add_argument("--categories", nargs="+", action="extend", default=None,
                            help=f"restrict to: {', '.join(CATEGORIES)}")
        parser.add_argument("--max-new-tokens", type=int, default=None, help="per answer (default FastChat's 1024)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--reasoning-parser", default=None,
                            help="for a reasoning model: judge only its answer, not its thinking, and send only that "
                                 "back in turn 2 (think: what follows </think>; harmony: gpt-oss's final channel)")
        parser.add_argument("--mode", default="single", help="single (default) or pairwise (needs --baseline)")
        parser.add_argument("--baseline", default=None,
                            help="an mt-bench run folder: the answers pairwise grading compares against, and "
                                 "the answers the judge-free divergence is measured on")
        g = parser  # the judge (default: the suite's own server with the embedded model)
        g.add_argument("--judge-base-url", default=None, help="an OpenAI-compatible endpoint serving the judge")
        g.add_argument("--judge-model", default=None, help="the judge's model id there")
        g.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                       help="environment variable with the judge endpoint's key (default OPENAI_API_KEY)")
        g.add_argument("--judge-tokenizer", default=None,
                       help="the judge's tokenizer (name, HF folder or .gguf) for probability-weighted ratings")
        g.add_argument("--judge-rating", default=None,
                       help="parsed, probability or both (default: both for an endpoint judge with a tokenizer, "
                            "parsed without one, probability for the embedded judge)")
        g.add_argument("--judge-concurrency", type=int, default=8)
        g.add_argument("--judge-temperature", type=float, default=None,
                       help="the judge's sampling temperature (default FastChat's 0; a model that takes only 1, "
                            "such as OpenAI's reasoning models, needs 1)")
        g.add_argument("--calibration-questions", type=int, default=None,
                       help="reference answers used to calibrate the judge (default all 30)")

    def prepare(self, task: MTBenchTask, args) -> MTBenchJob:
        cfg = MTBenchConfig(questions=args.questions, categories=tuple(args.categories) if args.categories else None,
                            max_new_tokens=args.max_new_tokens, seed=args.seed, mode=args.mode,
                            baseline=args.baseline, reasoning_parser=args.reasoning_parser)
        if bool(args.judge_base_url) != bool(args.judge_model):
            raise ValueError("--judge-base-url and --judge-model go together (an endpoint and the judge's id there)")
        if args.judge_rating not in (None, "parsed", "probability", "both"):
            raise ValueError(f"--judge-rating {args.judge_rating!r}; valid: parsed, probability, both")
        if args.judge_concurrency < 1:
            raise ValueError(f"--judge-concurrency {args.judge_concurrency}: valid: an integer >= 1")
        if args.calibration_questions is not None and not 1 <= args.calibration_questions <= 30:
            raise ValueError(f"--calibration-questions {args.calibration_questions}: 1..30")
        if args.judge_temperature is not None and not 0 <= args.judge_temperature <= 2:
            raise ValueError(f"--judge-temperature {args.judge_temperature:g}; valid: 0..2")
        job = prepare_mtbench(cfg, task)
        if args.judge_base_url:  # reachable, serving the judge and taking its settings, before any model loads
            from ..judge_default import check_judge_endpoint

            check_judge_endpoint(args)
        job.judge_args = args  # type: ignore[attr-defined]
        return job

    def run(self, job: MTBenchJob, backend: Backend, out_dir: Path, *, progress: bool = True) -> RunResult:
        from ..judge_default import judge_for

        args = job.judge_args  # type: ignore[attr-defined]
        with judge_for(args, backend) as judge:
            divergence = None
            if job.config.baseline:
                from ..divergence import divergence_for_run

                divergence = divergence_for_run(backend, job, job.config.baseline)
            return run_mtbench(backend, job, out_dir, judge, progress=progress,
                               calibration_limit=args.calibration_questions, divergence=divergence)

    def summary(self, result: RunResult) -> str:
        return format_summary(result.metrics, result.run)
