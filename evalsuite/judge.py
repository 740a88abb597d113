"""An LLM judge behind any OpenAI-compatible endpoint, FastChat's MT-Bench rules, and the means to
trust it: a probability-weighted rating, a judgment cache, and a calibration of the judge.

* Prompts and settings are data (judges/mt-bench.yaml and FastChat's judge_prompts.jsonl); the
  hash of both goes into every judgment and into the cache key.
* Parsed rating, FastChat's rule: the first ``[[n]]``, else the first ``[n]``. A reply without one,
  or with a rating outside 1-10, is unscored with its reason, never 0.
* Probability-weighted rating (where the endpoint returns top log-probabilities on
  /v1/completions and the judge's chat template is known here): after the judge prompt (and its
  reply, where it wrote one) the assistant turn continues with ``Rating: [[``; the rating is the
  expected value over the next tokens "1".."9" and "10" (as "1" then "0" where the vocabulary
  splits it, or one "10" token), normalised over that mass. It never fails to parse.
* Judgments are cached in SQLite under the cache folder, keyed by (judge, config hash, the exact
  messages, the rating method): a rerun calls the judge only for what is missing.
* The API key comes from the environment (through ``OpenAIBackend``) and is never stored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .assets import cache_dir
from .backends.base import Failure
from .backends.openai import OpenAIBackend
from .engine.requests import SamplingParams

JUDGES_DIR = Path(__file__).resolve().parent.parent / "judges"
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(reply: str) -> tuple[float | None, str | None]:
    """FastChat's single-grading rule; returns (rating, None) or (None, why it is unscored)."""
    match = ONE_SCORE.search(reply) or ONE_SCORE_BACKUP.search(reply)
    if not match:
        return None, "no [[rating]] in the reply"
    value = float(match.group(1))
    if not 1 <= value <= 10:
        return None, f"rating {match.group(1)} is outside 1-10"
    return value, None


def parse_pair_verdict(reply: str) -> str:
    """FastChat's pairwise rule: "[[A]]", "[[B]]", "[[C]]" (tie), checked in that order."""
    for tag, winner in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if tag in reply:
            return winner
    return "error"


def expected_rating(first: dict[str, float], after_one: dict[str, float] | None) -> tuple[float | None, float]:
    """The expected rating from top log-probabilities of the token after ``[[`` (``first``) and
    of the token after ``[[1`` (``after_one``). Returns (rating or None, probability mass on
    ratings)."""
    p = {str(d): math.exp(first[str(d)]) for d in range(1, 10) if str(d) in first}
    p10 = math.exp(first["10"]) if "10" in first else 0.0
    if "1" in p and after_one is not None:
        zero = math.exp(after_one["0"]) if "0" in after_one else 0.0
        p10 += p["1"] * zero
        p["1"] *= 1 - zero
    mass = sum(p.values()) + p10
    if mass <= 1e-9:
        return None, mass
    return (sum(int(d) * v for d, v in p.items()) + 10 * p10) / mass, mass


@dataclass
class JudgeConfig:
    raw: dict[str, Any]
    prompts: dict[str, dict[str, Any]]
    sha256: str

    @classmethod
    def load(cls, path: Path = JUDGES_DIR / "mt-bench.yaml") -> JudgeConfig:
        raw_text = path.read_text()
        raw = yaml.safe_load(raw_text)
        prompts_path = path.parent / raw["prompts"]
        prompts_text = prompts_path.read_text()
        if hashlib.sha256(prompts_text.encode()).hexdigest() != raw["prompts_sha256"]:
            raise ValueError(f"{prompts_path} does not match prompts_sha256 in {path}")
        prompts = {p["name"]: p for p in map(json.loads, prompts_text.splitlines()) if p}
        sha = hashlib.sha256((raw_text + prompts_text).encode()).hexdigest()
        return cls(raw, prompts, sha)

    def with_temperature(self, temperature: float | None) -> JudgeConfig:
        """The same judging at another temperature (``--judge-temperature``; None: as configured).
        It changes the hash, so the judgments' records and cache keys tell the two apart."""
        if temperature is None or temperature == self.raw["temperature"]:
            return self
        raw = {**self.raw, "temperature": float(temperature)}
        sha = hashlib.sha256(f"{self.sha256} temperature={float(temperature)!r}".encode()).hexdigest()
        return JudgeConfig(raw, self.prompts, sha)

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=int(self.raw["max_tokens"]), temperature=float(self.raw["temperature"]))

    def prompt_for(self, mode: str, category: str, turn: int) -> dict[str, Any]:
        kind = "math" if category in self.raw["reference_categories"] else "general"
        return self.prompts[self.raw[mode][kind][turn - 1]]


def _reference_kwargs(prompt: dict[str, Any], reference: list[str] | None, turn: int) -> dict[str, str]:
    """The reference answers a math prompt shows (turn 1's, and turn 2's for the second turn)."""
    if reference is None or "ref_answer_1" not in prompt["prompt_template"]:
        return {}
    return {"ref_answer_1": reference[0], **({"ref_answer_2": reference[1]} if turn == 2 else {})}


def render_single(prompt: dict[str, Any], question: dict, answers: list[str], turn: int,
                  reference: list[str] | None) -> list[dict[str, str]]:
    """FastChat's create_conv_single: the system prompt and the formatted user prompt."""
    kw = _reference_kwargs(prompt, reference, turn)
    if turn == 2:
        user = prompt["prompt_template"].format(question_1=question["turns"][0], question_2=question["turns"][1],
                                                answer_1=answers[0], answer_2=answers[1], **kw)
    else:
        user = prompt["prompt_template"].format(question=question["turns"][0], answer=answers[0], **kw)
    return [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]


def render_pair(prompt: dict[str, Any], question: dict, answers_a: list[str], answers_b: list[str], turn: int,
                reference: list[str] | None) -> list[dict[str, str]]:
    """FastChat's run_judge_pair prompt: answers A and B of one question (or conversation)."""
    kw = _reference_kwargs(prompt, reference, turn)
    if turn == 2:
        user = prompt["prompt_template"].format(
            question_1=question["turns"][0], question_2=question["turns"][1], answer_a_1=answers_a[0],
            answer_b_1=answers_b[0], answer_a_2=answers_a[1], answer_b_2=answers_b[1], **kw)
    else:
        user = prompt["prompt_template"].format(question=question["turns"][0], answer_a=answers_a[0],
                                                answer_b=answers_b[0], **kw)
    return [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]


class JudgmentCache:
    """(key -> judgment JSON) in one SQLite file; one transaction per write. Default:
    $EVALSUITE_JUDGMENTS (a file several machines may share), else judgments.sqlite in the cache
    folder."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path or os.environ.get("EVALSUITE_JUDGMENTS") or cache_dir() / "judgments.sqlite")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def get(self, key: str) -> dict[str, Any] | None:
        db = self._db()
        try:
            row = db.execute("SELECT value FROM judgments WHERE key = ?", (key,)).fetchone()
        finally:
            db.close()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        db = self._db()
        try:
            with db:
                db.execute("INSERT OR REPLACE INTO judgments (key, value) VALUES (?, ?)", (key, json.dumps(value)))
        finally:
            db.close()


@dataclass
class Judge:
    """A judge model behind an endpoint. ``rating`` is "parsed" (the judge writes a reply and
    FastChat's rule reads it), "probability" (no reply: the expected rating right after the
    prompt), or "both" (a reply, its parsed rating, and the expected rating after it)."""

    backend: OpenAIBackend
    config: JudgeConfig
    rating: str = "both"
    tokenizer: Any = None  # the judge's, for its chat template (probability ratings)
    cache: JudgmentCache = field(default_factory=JudgmentCache)
    calls: int = 0  # judge requests made (cache hits make none)

    def __post_init__(self) -> None:
        if self.rating not in ("parsed", "probability", "both"):
            raise ValueError(f"judge rating {self.rating!r}; valid: parsed, probability, both")
        if self.rating != "parsed" and (self.tokenizer is None or self.tokenizer.chat_template is None):
            raise ValueError("a probability-weighted rating needs the judge's tokenizer with a chat template "
                             "(--judge-tokenizer); use --judge-rating parsed otherwise")

    @property
    def identity(self) -> dict[str, Any]:
        ident = self.backend.identity()
        return {"model": self.backend.model, "served": ident.get("model"), "recipe": ident.get("recipe"),
                "config_sha256": self.config.sha256, "rating": self.rating}

    def _key(self, messages: list[dict[str, str]], what: str) -> str:
        blob = json.dumps([self.identity, messages, what], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    # ---------------------------------------------------------------- requests
    def _reply(self, messages: list[dict[str, str]]) -> str | Failure:
        self.calls += 1
        (out,) = self.backend.generate([messages], self.config.sampling())
        return out if isinstance(out, Failure) else out.text

    def _top(self, text: str) -> dict[str, float] | Failure:
        """Top-20 log-probabilities of the next token after ``text`` (a rendered prompt)."""
        self.calls += 1
        reply = self.backend._call(lambda: self.backend.client.completions.create(
            model=self.backend.model, prompt=text, max_tokens=1, temperature=0.0, logprobs=20))
        if isinstance(reply, Failure):
            return reply
        try:
            return dict(reply.choices[0].logprobs.top_logprobs[0])
        except (AttributeError, IndexError, TypeError) as e:
            return Failure(f"the endpoint returned no top log-probabilities ({type(e).__name__}: {e})")

    def _render(self, messages: list[dict[str, str]], reply: str | None, prefix: str) -> str:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text + (reply.rstrip() + "\n\n" if reply else "") + prefix

    # ---------------------------------------------------------------- single and pairwise
    def grade(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """One single-answer judgment: {"judgment", "score", "unscored", "prob_score", "prob_mass",
        "failed"}; cached."""
        key = self._key(messages, "single")
        hit = self.cache.get(key)
        if hit is not None:
            return {**hit, "cached": True}
        out: dict[str, Any] = {"judgment": "", "score": None, "unscored": None, "prob_score": None, "prob_mass": None}
        reply = None
        if self.rating in ("parsed", "both"):
            reply = self._reply(messages)
            if isinstance(reply, Failure):
                return {**out, "failed": reply.reason}  # not cached: a rerun tries again
            out["judgment"] = reply
            out["score"], out["unscored"] = parse_rating(reply)
        if self.rating in ("probability", "both"):
            text = self._render(messages, reply, self.config.raw["probability_prefix"])
            first = self._top(text)
            if isinstance(first, Failure):
                return {**out, "failed": first.reason}
            after = self._top(text + "1") if "1" in first else None
            if isinstance(after, Failure):
                return {**out, "failed": after.reason}
            out["prob_score"], out["prob_mass"] = expected_rating(first, after)
            if out["prob_score"] is None:
                out["prob_unscored"] = "no rating token among the top 20 after the rating prefix"
        self.cache.put(key, out)
        return out

    def compare(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """One pairwise judgment (one order): {"judgment", "winner" (A, B, tie, error),
        "prob_winner"}; cached."""
        key = self._key(messages, "pair")
        hit = self.cache.get(key)
        if hit is not None:
            return {**hit, "cached": True}
        out: dict[str, Any] = {"judgment": "", "winner": "error", "prob_winner": None}
        reply = None
        if self.rating in ("parsed", "both"):
            reply = self._reply(messages)
            if isinstance(reply, Failure):
                return {**out, "failed": reply.reason}
            out["judgment"], out["winner"] = reply, parse_pair_verdict(reply)
        if self.rating in ("probability", "both"):
            top = self._top(self._render(messages, reply, self.config.raw["pairwise_probability_prefix"]))
            if isinstance(top, Failure):
                return {**out, "failed": top.reason}
            p = {w: math.exp(top[t]) for t, w in (("A", "A"), ("B", "B"), ("C", "tie")) if t in top}
            out["prob_winner"] = max(p, key=p.get) if p else "error"
        self.cache.put(key, out)
        return out


# -------------------------------------------------------------------------------- calibration

def corrupt(answer: str, how: str, rng: random.Random, other_question: str | None = None,
            truncate_fraction: float = 0.2) -> str:
    if how == "truncated":
        return answer[:max(1, int(len(answer) * truncate_fraction))]
    if how == "shuffled":  # sentences in another order (words, for fewer than 3 sentences)
        parts = re.split(r"(?<=[.!?])\s+", answer)
        if len(parts) < 3:
            parts = answer.split()
        shuffled = parts[:]
        rng.shuffle(shuffled)
        if shuffled == parts:
            shuffled.reverse()
        return " ".join(shuffled)
    if how == "empty":
        return ""
    if how == "wrong_question":
        return answer  # the answer is unchanged; it is paired with another question
    raise ValueError(f"unknown corruption {how!r}")


def auc(good: list[float], bad: list[float]) -> float:
    """P(a good answer's rating > a bad one's), ties counting one half (Mann-Whitney)."""
    if not good or not bad:
        return float("nan")
    wins = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
    return wins / (len(good) * len(bad))


def calibrate(judge: Judge, questions: dict[int, dict], references: dict[int, list[str]], *,
              limit: int | None = None) -> dict[str, Any]:
    """Grade the reference answers as they are and corrupted (single-v1, turn 1); the score gap
    and the AUC of good against corrupted, for the parsed and the probability-weighted rating."""
    cal = judge.config.raw["calibration"]
    rng = random.Random(cal["seed"])
    qids = sorted(references)[:limit]
    prompt = judge.config.prompts["single-v1"]
    cases: list[tuple[str, int, dict, str]] = []  # (kind, qid, question shown, answer)
    for i, qid in enumerate(qids):
        answer = references[qid][0]
        cases.append(("good", qid, questions[qid], answer))
        for how in cal["corruptions"]:
            if how == "wrong_question":
                other = questions[qids[(i + 1) % len(qids)]]
                cases.append((how, qid, other, answer))
            else:
                cases.append((how, qid, questions[qid],
                              corrupt(answer, how, rng, truncate_fraction=cal["truncate_fraction"])))
    messages = [render_single(prompt, q, [a], 1, None) for _, _, q, a in cases]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, judge.backend.concurrency)) as pool:
        results = list(pool.map(judge.grade, messages))
    out: dict[str, Any] = {"questions": len(qids), "judged": len(cases),
                           "failed": sum(1 for r in results if r.get("failed"))}
    for field_ in ("score", "prob_score"):
        good = [r[field_] for (k, *_), r in zip(cases, results) if k == "good" and r.get(field_) is not None]
        bad = [r[field_] for (k, *_), r in zip(cases, results) if k != "good" and r.get(field_) is not None]
        if not good and not bad:
            continue
        per = {how: [r[field_] for (k, *_), r in zip(cases, results) if k == how and r.get(field_) is not None]
               for how in cal["corruptions"]}
        a = auc(good, bad)
        out["parsed" if field_ == "score" else "probability"] = {
            "good_mean": sum(good) / len(good) if good else None, "bad_mean": sum(bad) / len(bad) if bad else None,
            "gap": (sum(good) / len(good) - sum(bad) / len(bad)) if good and bad else None, "auc": a,
            "unscored": sum(1 for r in results if r.get(field_) is None and not r.get("failed")),
            "by_corruption": {h: (sum(v) / len(v) if v else None) for h, v in per.items()},
            "discriminative": bool(a == a and a >= cal["min_auc"])}
    return out
