"""Log-likelihood of token continuations, batched (lm-eval's ``loglikelihood`` contract on tokens).

A request is (context tokens, continuation tokens), both non-empty. Its log-likelihood is
sum_i log p(continuation[i] | context + continuation[:i]); it is greedy when every continuation
token is the argmax of its distribution. Tokenization, and with it where the space between words
goes, is the caller's business (lm-eval moves trailing context spaces into the continuation).

Requests whose model inputs, context + continuation[:-1], are identical share one forward pass:
MMLU's four single-letter answers cost one forward per question. Inputs are sorted by length and
packed without padding (see ``Step``), and only the rows whose next-token distributions are
needed reach lm_head, in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .model import CausalLM, Step


@dataclass(frozen=True)
class ScoreRequest:
    context: tuple[int, ...]
    continuation: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.context:
            raise ValueError("ScoreRequest.context is empty; put a BOS or prefix token first")
        if not self.continuation:
            raise ValueError("ScoreRequest.continuation is empty; nothing to score")


@dataclass(frozen=True)
class ScoreResult:
    logprob: float  # sum over continuation tokens, natural log
    is_greedy: bool
    token_logprobs: tuple[float, ...]


def score(model: CausalLM, requests: Sequence[ScoreRequest], *, max_batch_tokens: int = 4096,
          max_batch_size: int = 64, progress: Callable[[int], None] | None = None) -> list[ScoreResult]:
    """Score every request; results come back in request order.

    ``max_batch_tokens`` bounds the packed tokens of one forward (a longer single input runs alone); ``progress`` is called with
    the number of requests finished after each forward.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.context + r.continuation[:-1], []).append(i)
    for inp in groups:
        model.check_length(len(inp))
    inputs = sorted(groups, key=len, reverse=True)
    results: list[ScoreResult | None] = [None] * len(requests)
    start = 0
    while start < len(inputs):
        n, tokens = 0, 0
        while start + n < len(inputs) and n < max_batch_size and (
                n == 0 or tokens + len(inputs[start + n]) <= max_batch_tokens):
            tokens += len(inputs[start + n])
            n += 1
        batch = inputs[start:start + n]
        _score_batch(model, batch, groups, requests, results)
        if progress is not None:
            progress(sum(len(groups[b]) for b in batch))
        start += n
    return results  # type: ignore[return-value]


@torch.inference_mode()
def _score_batch(model: CausalLM, batch: list[tuple[int, ...]], groups: dict[tuple[int, ...], list[int]],
                 requests: Sequence[ScoreRequest], results: list) -> None:
    lens = [len(inp) for inp in batch]
    tokens = torch.tensor([t for inp in batch for t in inp]).view(1, -1)
    hidden = model.hidden(tokens, Step.for_prefill(lens))[0]
    # The rows each request needs: the packed positions predicting its continuation tokens.
    offsets = [0]
    for n in lens[:-1]:
        offsets.append(offsets[-1] + n)
    rows: list[int] = []
    row_index: dict[int, int] = {}
    needed = []
    for b, inp in enumerate(batch):
        for i in groups[inp]:
            r = requests[i]
            first = offsets[b] + len(r.context) - 1
            span = range(first, first + len(r.continuation))
            for row in span:
                if row not in row_index:
                    row_index[row] = len(rows)
                    rows.append(row)
            needed.append((i, [row_index[row] for row in span]))
    logprobs = torch.log_softmax(model.logits(hidden[torch.tensor(rows)], float32=True), dim=-1)
    greedy = logprobs.argmax(dim=-1)
    for i, row_ids in needed:
        cont = torch.tensor(requests[i].continuation)
        rid = torch.tensor(row_ids)
        token_lp = logprobs[rid, cont]
        results[i] = ScoreResult(logprob=float(token_lp.sum()),
                                 is_greedy=bool((greedy[rid] == cont).all()),
                                 token_logprobs=tuple(token_lp.tolist()))
