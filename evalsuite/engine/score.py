"""Log-likelihood of token continuations, batched (lm-eval's ``loglikelihood`` contract on tokens).

A request is (context tokens, continuation tokens), both non-empty. Its log-likelihood is
sum_i log p(continuation[i] | context + continuation[:i]); it is greedy when every continuation
token is the argmax of its distribution. Tokenization, and with it where the space between words
goes, is the caller's business (lm-eval moves trailing context spaces into the continuation).

Each distinct context runs once: a packed prefill writes its K/V to a cache and yields the
distribution of every continuation's first token; continuations longer than one token then run
as short extensions reading that cached context. MMLU's four letters cost one context forward,
and the four cloze answers one context forward plus four few-token extensions. A context that
no other request shares (a perplexity window) is prefilled together with its continuation, the
forward an endpoint runs for the whole prompt, so both give the same numbers; so is one shorter
than ``MIN_SHARED_PREFIX`` tokens, which sharing would not save (every document's first window
has the same one-token context), as an endpoint groups prompts only from that many shared
tokens. Sequences are packed without padding (see ``Step``), and only the rows whose next-token
distributions are needed reach lm_head, in float32. On a GPU every projection runs on blocks of a fixed number of
rows (``linear.invariant_row_blocks``), so a request gets the same numbers alone or in any batch
there too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .cache import KVCache
from .linear import invariant_row_blocks
from .model import CausalLM, Step
from .requests import ScoreRequest, ScoreResult

MIN_SHARED_PREFIX = 8  # a shorter context (a prompt prefix, on the server) is not shared: each request runs it


def score(model: CausalLM, requests: Sequence[ScoreRequest], *, max_batch_tokens: int = 4096,
          max_batch_size: int = 64, progress: Callable[[int], None] | None = None) -> list[ScoreResult]:
    """Score every request; results come back in request order.

    ``max_batch_tokens`` bounds the packed context tokens of one forward (a longer context runs
    alone); ``progress`` is called with the number of requests finished after each batch.
    """
    shared: dict[tuple[int, ...], int] = {}
    for r in requests:
        shared[r.context] = shared.get(r.context, 0) + 1
    # A context no other request shares (a perplexity window), or too short to be worth sharing,
    # runs with its continuation in one prefill: the forward an endpoint runs for the whole
    # prompt, and no cache.
    by_context: dict[tuple[int, ...], list[int]] = {}
    folded: dict[int, int] = {}  # request index -> continuation tokens predicted inside its prefill
    long_rope = model.config.long_rope
    for i, r in enumerate(requests):
        key = r.context
        # LongRoPE rotates a forward by the length it reaches: a context below the original
        # context whose continuation crosses it is not the same forward as the whole prompt
        alone = long_rope(len(r.context)) != long_rope(len(r.context) + len(r.continuation) - 1)
        lone = shared[r.context] == 1 or len(r.context) < MIN_SHARED_PREFIX
        if (lone or alone) and len(r.continuation) > 1:
            key = r.context + r.continuation[:-1]
            folded[i] = len(r.continuation)
        by_context.setdefault(key, []).append(i)
    for ctx, ids in by_context.items():
        model.check_length(len(ctx) + max(0 if i in folded else len(requests[i].continuation) - 1 for i in ids))
    contexts = sorted(by_context, key=len, reverse=True)
    results: list[ScoreResult | None] = [None] * len(requests)
    start = 0
    while start < len(contexts):
        n, tokens = 0, 0
        while start + n < len(contexts) and n < max_batch_size and (
                n == 0 or tokens + len(contexts[start + n]) <= max_batch_tokens):
            tokens += len(contexts[start + n])
            n += 1
        batch = contexts[start:start + n]
        _score_batch(model, batch, by_context, requests, results, folded)
        if progress is not None:
            progress(sum(len(by_context[c]) for c in batch))
        start += n
    return results  # type: ignore[return-value]


@torch.inference_mode()
def _score_batch(model: CausalLM, contexts: list[tuple[int, ...]], by_context: dict[tuple[int, ...], list[int]],
                 requests: Sequence[ScoreRequest], results: list, folded: dict[int, int]) -> None:
    dev = model.device
    lens = [len(c) for c in contexts]
    # (request index, context slot) for continuations that need more than the context's last row
    extend = [(i, b) for b, c in enumerate(contexts) for i in by_context[c]
              if len(requests[i].continuation) > 1 and i not in folded]
    cache = KVCache(model.config, len(contexts), max(lens), model.cache_dtype, dev) if extend else None
    tokens = torch.tensor([t for c in contexts for t in c], device=dev).view(1, -1)
    block, logit_block = invariant_row_blocks(dev)
    hidden = model.hidden(tokens, Step.for_prefill(lens, cache, device=dev, row_block=block))[0]
    ends = torch.tensor(lens, device=dev).cumsum(0)
    rows = [hidden[ends - 1]]  # row b: after context b
    offset = len(contexts)
    folded_row = {}
    for b, c in enumerate(contexts):
        for i in by_context[c]:
            if i in folded:  # its predictions are the last folded[i] rows of its own prefill
                m = folded[i]
                rows.append(hidden[int(ends[b]) - m:int(ends[b])])
                folded_row[i] = offset
                offset += m
    first_ext_row = {}
    if extend:
        ext_lens = [len(requests[i].continuation) - 1 for i, _ in extend]
        ext_tokens = torch.tensor([t for i, _ in extend for t in requests[i].continuation[:-1]], device=dev).view(1, -1)
        step = Step.for_extend(ext_lens, cache, [b for _, b in extend], [lens[b] for _, b in extend], block)
        rows.append(model.hidden(ext_tokens, step)[0])
        for (i, _), m in zip(extend, ext_lens):
            first_ext_row[i] = offset
            offset += m
    # every request's (row, target token) pairs, in request order
    order, row_ids, targets = [], [], []
    for b, c in enumerate(contexts):
        for i in by_context[c]:
            cont = requests[i].continuation
            first = folded_row[i] if i in folded else None
            row_ids += [first + j for j in range(len(cont))] if first is not None else \
                [b] + [first_ext_row[i] + j for j in range(len(cont) - 1)]
            targets += cont
            order.append(i)
    token_lp, greedy = _target_logprobs(model, torch.cat(rows), torch.tensor(row_ids, device=dev),
                                        torch.tensor(targets, device=dev), logit_block)
    token_lp, greedy = token_lp.tolist(), greedy.tolist()
    start = 0
    for i in order:
        n = len(requests[i].continuation)
        lps = token_lp[start:start + n]
        # summed in float64, in order: what a client summing an endpoint's per-token values gets
        results[i] = ScoreResult(logprob=sum(lps), is_greedy=all(greedy[start:start + n]), token_logprobs=tuple(lps))
        start += n


LOGIT_ROWS = 1024  # rows of full-vocabulary log-probabilities held at once (a multiple of lm_head's row blocks)


def _target_logprobs(model: CausalLM, hidden: torch.Tensor, row_ids: torch.Tensor, targets: torch.Tensor,
                     logit_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(targets[k] | row row_ids[k]) and whether it is the row's argmax, in float32, from
    ``LOGIT_ROWS`` rows of ``hidden`` at a time: a perplexity batch (two windows of 2,048 tokens)
    would otherwise hold 4,096 x vocabulary float32 logits and as many log-probabilities at once
    (4.2 GB with Llama 3's 128,256 tokens). Each row's numbers are its own (log-softmax is per row)."""
    token_lp = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    greedy = torch.empty(len(targets), dtype=torch.bool, device=hidden.device)
    for lo in range(0, hidden.shape[0], LOGIT_ROWS):
        logprobs = torch.log_softmax(model.logits(hidden[lo:lo + LOGIT_ROWS], float32=True, row_block=logit_block),
                                     dim=-1)
        pick = (row_ids >= lo) & (row_ids < lo + LOGIT_ROWS)
        rows, want = row_ids[pick] - lo, targets[pick]
        token_lp[pick] = logprobs[rows, want]
        greedy[pick] = logprobs.argmax(dim=-1)[rows] == want
    return token_lp, greedy
