"""In-flight batching: one thread owns the model; requests join the running decode batch as soon
as a slot is free and leave when done.

Each loop turn admits waiting generations into free slots (one packed prefill of at most
``max_prefill_tokens`` prompt tokens), runs the queued prompt-scoring work (also bounded), then
advances every running sequence by one token. A long prompt therefore costs the running batch
one bounded prefill per turn, not a stall. HTTP handlers only put work on the queue and read
results from per-request queues; they never touch the model.

A generation whose client went away is cancelled: it leaves the batch at the next turn and its
slot is free again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..engine.cache import KVCache
from ..engine.generate import DecodeBatch, Generation, SamplingParams
from ..engine.linear import invariant_row_blocks
from ..engine.model import CausalLM, Step
from ..engine.score import MIN_SHARED_PREFIX, common_prefix

log = logging.getLogger(__name__)


@dataclass
class GenerationJob:
    """One sequence to generate. ``post(kind, value)`` receives ("tokens", [ids]) after each step
    that made some, then ("done", finish_reason) or ("error", message); it is called on the
    scheduler thread (an HTTP handler passes one that hands the event to its event loop). The
    default puts events on ``events``. ``stop_fn(tokens)`` may end it early (stop strings)."""

    prompt: list[int]
    params: SamplingParams
    stop_fn: object = None
    post: object = None
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    gen: Generation | None = None
    sent: int = 0  # tokens already put on ``events``
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, kind: str, value) -> None:
        if self.post is not None:
            self.post(kind, value)
        else:
            self.events.put((kind, value))


@dataclass
class PromptLogprobJob:
    """Log-probabilities of every token of each prompt given the ones before it, and the ``top``
    most likely alternatives at each position (the OpenAI ``echo`` + ``logprobs`` contract). The
    prompts of one request travel as one job, so they are always scored in the same pass and the
    ones sharing a context (an MMLU question's answers) run that context once."""

    prompts: list[list[int]]
    top: int
    future: Future = field(default_factory=Future)

    @property
    def tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


@dataclass(frozen=True)
class PromptLogprobs:
    token_logprobs: list[float | None]  # None for the first token, which nothing predicts
    top: list[dict[int, float] | None]
    greedy: list[int | None]


class Scheduler:
    def __init__(self, model: CausalLM, *, max_batch_size: int = 32, max_len: int = 2048,
                 max_prefill_tokens: int = 2048, prefix_cache: bool = True):
        self.model = model
        self.max_len = min(max_len, model.config.max_position_embeddings)
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.batch = DecodeBatch(model, max_batch_size, self.max_len, prefix_cache=prefix_cache)
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: list[GenerationJob] = []
        self.scoring: list[PromptLogprobJob] = []
        self.jobs: dict[int, GenerationJob] = {}  # id(Generation) -> job, for the running ones
        self.stats = {"steps": 0, "prefills": 0, "tokens": 0, "cancelled": 0}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="evalsuite-scheduler", daemon=True)

    # ------------------------------------------------------------------ called from any thread
    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self.inbox.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: GenerationJob | PromptLogprobJob) -> None:
        self.inbox.put(job)

    @property
    def running(self) -> int:
        return len(self.batch.running)

    # ------------------------------------------------------------------ the scheduler thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            idle = not (self.waiting or self.scoring or self.batch.running)
            self._drain(block=idle)
            try:
                self._turn()
            except Exception as e:  # keep serving: fail the work of this turn, not the server
                log.exception("scheduler turn failed")
                self._fail_all(f"{type(e).__name__}: {e}")

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            if isinstance(item, GenerationJob):
                self.waiting.append(item)
            else:
                self.scoring.append(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _turn(self) -> None:
        self._drop_cancelled()
        if self.waiting and self.batch.free_slots:
            self._admit()
            self._retire()  # a sequence may end at its first token (EOS, a stop string, max_tokens 1)
        if self.scoring:
            self._score()
        if self.batch.running:
            self.batch.step()
            self.stats["steps"] += 1
            for g in self.batch.running:
                self._emit(self.jobs[id(g)])
        self._retire()

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.waiting if j.cancelled.is_set()]:
            self.waiting.remove(job)
            self.stats["cancelled"] += 1
        for g in list(self.batch.running):
            if self.jobs[id(g)].cancelled.is_set():
                self.batch.remove(g)
                del self.jobs[id(g)]
                self.stats["cancelled"] += 1

    def _admit(self) -> None:
        joining, tokens = [], 0
        while self.waiting and len(joining) < self.batch.free_slots:
            n = len(self.waiting[0].prompt)
            if joining and tokens + n > self.max_prefill_tokens:
                break
            job = self.waiting.pop(0)
            job.gen = Generation(list(job.prompt), job.params)
            joining.append(job)
            tokens += n
        try:
            self.batch.add([j.gen for j in joining])
        except Exception as e:  # these jobs fail, with their reason; the running ones go on
            if not isinstance(e, ValueError):  # a bad prompt is the client's; anything else is logged
                log.exception("prefill failed")
            for j in joining:
                if any(g is j.gen for g in self.batch.running):  # admitted before the failure
                    self.batch.remove(j.gen)
                j.send("error", str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
            return
        self.stats["prefills"] += 1
        for j in joining:
            self.jobs[id(j.gen)] = j
            self._emit(j)

    def _emit(self, job: GenerationJob) -> None:
        g = job.gen
        new = g.tokens[job.sent:]
        if new:
            job.send("tokens", list(new))
            self.stats["tokens"] += len(new)
        job.sent = len(g.tokens)
        if g.finish_reason is None and job.stop_fn is not None and job.stop_fn(g.tokens):
            g.finish_reason = "stop"

    def _retire(self) -> None:
        for g in list(self.batch.running):
            if g.finish_reason is not None:
                job = self.jobs.pop(id(g))
                self.batch.remove(g)
                job.send("done", g.finish_reason)

    def _score(self) -> None:
        batch, tokens = [], 0
        while self.scoring and (not batch or tokens + self.scoring[0].tokens <= self.max_prefill_tokens):
            job = self.scoring.pop(0)
            batch.append(job)
            tokens += job.tokens
        prompts = [p for j in batch for p in j.prompts]
        tops = [j.top for j in batch for _ in j.prompts]
        try:
            results, start = [], 0
            while start < len(prompts):  # forwards of at most max_prefill_tokens (a long request's too)
                end, tokens = start + 1, len(prompts[start])
                while end < len(prompts) and tokens + len(prompts[end]) <= self.max_prefill_tokens:
                    tokens += len(prompts[end])
                    end += 1
                results += prompt_logprobs(self.model, prompts[start:end], tops[start:end])
                start = end
        except Exception as e:
            for j in batch:
                j.future.set_exception(e)
            return
        start = 0
        for j in batch:
            j.future.set_result(results[start:start + len(j.prompts)])
            start += len(j.prompts)

    def _fail_all(self, message: str) -> None:
        for g in list(self.batch.running):
            self.batch.remove(g)
            job = self.jobs.pop(id(g), None)
            if job is not None:
                job.send("error", message)
        for job in self.waiting:
            job.send("error", message)
        self.waiting.clear()
        for job in self.scoring:
            if not job.future.done():
                job.future.set_exception(RuntimeError(message))
        self.scoring.clear()


def prefix_groups(prompts: list[list[int]]) -> list[tuple[int, list[int]]]:
    """Prompts grouped by a shared leading prefix: (prefix length, indices); a group's prefix runs
    once and each member keeps at least one token of its own. A prompt alone runs all but its last
    token (the one no asked-for log-probability needs): the forward ``engine.score`` runs for a
    (context, continuation) pair it does not share, of the same length, so both give the same
    numbers to the last bit (an attention kernel blocks its sums by the sequence's length).

    The grouping computes the fewest tokens: prompts sharing a prefix are neighbours in sorted
    order, and a group of m neighbours whose common prefix is P tokens (at least
    ``MIN_SHARED_PREFIX``) saves (m - 1) * P; the best split of the sorted prompts into such
    groups is found exactly (a dynamic programme over split points). The four answers of one MMLU
    question form one group at their context, even where two of them share more tokens (their
    answers' first words); questions that only share the instruction line ("The following are
    multiple choice questions ... about anatomy.") stay in groups of their own."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    n = len(order)
    lengths = [len(prompts[i]) for i in order]
    adjacent = [common_prefix(prompts[order[a]], prompts[order[a + 1]]) for a in range(n - 1)]
    # best[j]: the most tokens saved on order[:j]; cut[j]: where its last group starts
    best, cut = [0] * (n + 1), [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], cut[j] = best[j - 1], j - 1  # order[j-1] alone
        shared = lengths[j - 1] - 1
        for a in range(j - 2, -1, -1):  # the group order[a:j], its prefix shrinking as it grows
            shared = min(shared, adjacent[a], lengths[a] - 1)
            if shared < MIN_SHARED_PREFIX:
                break
            if best[a] + (j - a - 1) * shared > best[j]:
                best[j], cut[j] = best[a] + (j - a - 1) * shared, a
    groups: list[tuple[int, list[int]]] = []
    j = n
    while j:
        a = cut[j]
        plen = min(*adjacent[a:j - 1], min(lengths[a:j]) - 1) if j - a > 1 else max(lengths[a] - 1, 1)
        groups.append((plen, order[a:j]))
        j = a
    return groups[::-1]


@torch.inference_mode()
def prompt_logprobs(model: CausalLM, prompts: list[list[int]], tops: list[int]) -> list[PromptLogprobs]:
    """Every prompt token's log-probability given its prefix, and the ``tops`` best alternatives.

    Prompts that share a prefix (``prefix_groups``) run it once: one packed prefill of the
    prefixes writes their K/V to a cache, and one packed extension runs each member's own tokens
    reading its group's cached prefix, as ``engine.score`` runs a context and its continuations.
    Both are batch-invariant, so a prompt's numbers do not depend on what it is sent with, and a
    (context, answer) pair gets the numbers the in-process scorer gives it. The API returns every
    position, so lm_head and the log-softmax run in float32 on every row, but on a shared
    prefix's rows once for the whole group."""
    groups = []
    for plen, members in prefix_groups(prompts):
        # LongRoPE rotates a forward by the length it reaches: a prompt that crosses the original
        # context while its group's prefix does not runs whole, as its own group
        apart = [i for i in members if model.config.long_rope(len(prompts[i])) != model.config.long_rope(plen)]
        groups += [(len(prompts[i]), [i]) for i in apart]
        if len(apart) < len(members):
            groups.append((plen, [i for i in members if i not in apart]))
    prefixes = [prompts[members[0]][:plen] for plen, members in groups]
    lens = [len(p) for p in prefixes]
    device = model.device
    # (member, group) pairs whose own tokens past the prefix need more than the prefix's last row
    extend = [(i, g) for g, (plen, members) in enumerate(groups) for i in members if len(prompts[i]) - plen > 1]
    cache = KVCache(model.config, len(groups), max(lens), model.cache_dtype, device) if extend else None
    tokens = torch.tensor([t for p in prefixes for t in p], device=device).view(1, -1)
    block = invariant_row_blocks(device)[0]
    hidden = model.hidden(tokens, Step.for_prefill(lens, cache, device=device, row_block=block))[0]
    ext_rows: dict[int, torch.Tensor] = {}
    if extend:
        ext_lens = [len(prompts[i]) - groups[g][0] - 1 for i, g in extend]
        ext_tokens = torch.tensor([t for i, g in extend for t in prompts[i][groups[g][0]:-1]], device=device)
        step = Step.for_extend(ext_lens, cache, [g for _, g in extend], [lens[g] for _, g in extend], block)
        ext_hidden = model.hidden(ext_tokens.view(1, -1), step)[0]
        start = 0
        for (i, _), n in zip(extend, ext_lens):
            ext_rows[i] = ext_hidden[start:start + n]
            start += n
    # Rows to score and the token each predicts: a group's prefix rows but its last (shared by
    # every member), then each member's own rows (the prefix's last row and its extension rows).
    row_parts, targets, spans = [], [], []  # spans: (group's shared span, member's own span) per prompt
    at, shared = 0, {}
    start = 0
    for g, ((plen, members), n) in enumerate(zip(groups, lens)):
        prefix_rows = hidden[start:start + n]
        start += n
        prefix = prefixes[g]
        row_parts.append(prefix_rows[:plen - 1])
        targets += prefix[1:plen]
        shared[g] = (at, at + plen - 1)
        at += plen - 1
        for i in members:
            own = len(prompts[i]) - plen
            if own:
                row_parts.append(prefix_rows[plen - 1:])
                if i in ext_rows:
                    row_parts.append(ext_rows[i])
                targets += prompts[i][plen:]
            spans.append((i, shared[g], (at, at + own)))
            at += own
    chosen, greedy, alt_vals, alt_ids = _score_rows(model, torch.cat(row_parts), targets, max(tops))
    out: list[PromptLogprobs | None] = [None] * len(prompts)
    for i, (s0, s1), (o0, o1) in spans:
        idx = list(range(s0, s1)) + list(range(o0, o1))
        top = tops[i]
        alts: list[dict[int, float] | None] = [None]
        alts += [dict(zip(alt_ids[r][:top], alt_vals[r][:top])) for r in idx]
        out[i] = PromptLogprobs([None] + [chosen[r] for r in idx], alts, [None] + [greedy[r] for r in idx])
    return out  # type: ignore[return-value]


SCORE_CHUNK_BYTES = 512 << 20  # float32 full-vocabulary logits held at once: lm_head's GEMM wants many rows


def _score_rows(model: CausalLM, rows: torch.Tensor, targets: list[int], top: int
                ) -> tuple[list[float], list[int], list[list[float]], list[list[int]]]:
    """For each row: the log-probability of its target token, the greedy token and the ``top``
    best (log-probability, token) alternatives; float32 lm_head and log-softmax, in chunks."""
    chosen, greedy, vals, ids = [], [], [], []
    target = torch.tensor(targets, device=rows.device)
    chunk = max(64, min(2048, SCORE_CHUNK_BYTES // (4 * model.config.vocab_size)))
    for s in range(0, rows.shape[0], chunk):
        lp = torch.log_softmax(model.logits(rows[s:s + chunk], float32=True,
                                            row_block=invariant_row_blocks(rows.device)[1]), dim=-1)
        chosen += lp.gather(1, target[s:s + chunk, None])[:, 0].tolist()
        if top > 0:
            v, i = lp.topk(top, dim=-1)
            vals += v.tolist()
            ids += i.tolist()
            greedy += i[:, 0].tolist()
        else:
            greedy += lp.argmax(dim=-1).tolist()
    if top <= 0:
        vals = ids = [[] for _ in targets]
    return chosen, greedy, vals, ids
