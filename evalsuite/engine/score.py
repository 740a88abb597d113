"""Log-likelihood of token continuations, batched (lm-eval's ``loglikelihood`` contract on tokens).

A request is (context tokens, continuation tokens), both non-empty. Its log-likelihood is
sum_i log p(continuation[i] | context + continuation[:i]); it is greedy when every continuation
token is the argmax of its distribution. Tokenization, and with it where the space between words
goes, is the caller's business (lm-eval moves trailing context spaces into the continuation).

Each distinct context runs once: a packed prefill writes its K/V to a cache and yields the
distribution of every continuation's first token; continuations longer than one token then run
as short extensions reading that cached context. Continuation tokens that all of a context's
requests begin with (cloze answers sharing a first word) are prefilled with it, each request
keeping at least its last token: the common prefix an endpoint shares (``server.scheduler``),
so a group of prompts gets the same numbers there and here. MMLU's four letters cost one
context forward, and the four cloze answers one context forward plus four few-token extensions.
A context that no other request shares (a perplexity window) is prefilled together with its
continuation, the forward an endpoint runs for the whole prompt, so both give the same numbers;
so is one shorter than ``MIN_SHARED_PREFIX`` tokens, which sharing would not save (every
document's first window has the same one-token context), as an endpoint groups prompts only
from that many shared tokens. Sequences are packed without padding (see ``Step``), and only
the rows whose next-token distributions are needed reach lm_head, in float32. On a GPU every
projection runs on blocks of a fixed number of rows (``linear.invariant_row_blocks``), so a
request gets the same numbers alone or in any batch there too.
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
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        by_ctx.setdefault(r.context, []).append(i)
    # Each group of requests prefills its context and the continuation tokens all its members
    # share (but one each: every member's last token is its own), the forward an endpoint runs
    # for a group of prompts with that common prefix. A request alone (a perplexity window), or
    # one whose context is too short to be worth sharing, is a group of its own: its whole prompt
    # but the last token in one prefill, and no cache.
    by_context: dict[tuple[int, ...], list[int]] = {}  # the prefill's tokens -> the requests reading it
    inside: dict[int, int] = {}  # request index -> its continuation tokens fed inside that prefill
    long_rope = model.config.long_rope
    for ctx, ids in by_ctx.items():
        # LongRoPE rotates a forward by the length it reaches: a context below the original
        # context whose continuation crosses it is not the same forward as the whole prompt
        crossing = [i for i in ids if long_rope(len(ctx)) != long_rope(len(ctx) + len(requests[i].continuation) - 1)]
        rest = [i for i in ids if i not in crossing]
        parts = [[i] for i in crossing]
        if len(rest) == 1 or len(ctx) < MIN_SHARED_PREFIX:
            parts += [[i] for i in rest]
        elif rest:
            parts.append(rest)
        for part in parts:
            conts = [requests[i].continuation for i in part]
            e = min([common_prefix(conts[0], c) for c in conts[1:]] + [len(c) - 1 for c in conts])
            by_context.setdefault(ctx + conts[0][:e], []).extend(part)
            inside.update((i, e) for i in part)
    for key, ids in by_context.items():
        model.check_length(len(key) + max(len(requests[i].continuation) - 1 - inside[i] for i in ids))
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
        _score_batch(model, batch, by_context, requests, results, inside)
        if progress is not None:
            progress(sum(len(by_context[c]) for c in batch))
        start += n
    return results  # type: ignore[return-value]


@torch.inference_mode()
def _score_batch(model: CausalLM, contexts: list[tuple[int, ...]], by_context: dict[tuple[int, ...], list[int]],
                 requests: Sequence[ScoreRequest], results: list, inside: dict[int, int]) -> None:
    dev = model.device
    lens = [len(c) for c in contexts]
    # (request index, prefill slot) for continuations that need more than their prefill's rows
    extend = [(i, b) for b, c in enumerate(contexts) for i in by_context[c]
              if len(requests[i].continuation) - 1 > inside[i]]
    cache = KVCache(model.config, len(contexts), max(lens), model.cache_dtype, dev) if extend else None
    tokens = torch.tensor([t for c in contexts for t in c], device=dev).view(1, -1)
    block, logit_block = invariant_row_blocks(dev)
    hidden = model.hidden(tokens, Step.for_prefill(lens, cache, device=dev, row_block=block))[0]
    ends = torch.tensor(lens, device=dev).cumsum(0).tolist()
    # a request whose prefill holds e of its continuation's tokens reads its first e + 1
    # predictions from the prefill's last e + 1 rows (shared by the requests that share both)
    rows, offset, first_row, taken = [], 0, {}, {}
    for b, c in enumerate(contexts):
        for i in by_context[c]:
            e = inside[i]
            if (b, e) not in taken:
                rows.append(hidden[ends[b] - e - 1:ends[b]])
                taken[(b, e)], offset = offset, offset + e + 1
            first_row[i] = taken[(b, e)]
    first_ext_row = {}
    if extend:  # the rest of each continuation (but its last token) after its prefill, reading its cache
        ext_lens = [len(requests[i].continuation) - 1 - inside[i] for i, _ in extend]
        ext_tokens = torch.tensor([t for i, _ in extend for t in requests[i].continuation[inside[i]:-1]],
                                  device=dev).view(1, -1)
        step = Step.for_extend(ext_lens, cache, [b for _, b in extend], [lens[b] for _, b in extend], block)
        rows.append(model.hidden(ext_tokens, step)[0])
        for (i, _), m in zip(extend, ext_lens):
            first_ext_row[i] = offset
            offset += m
    # every request's (row, target token) pairs, in request order
    order, row_ids, targets = [], [], []
    for b, c in enumerate(contexts):
        for i in by_context[c]:
            cont, e = requests[i].continuation, inside[i]
            row_ids += [first_row[i] + j for j in range(e + 1)]
            row_ids += [first_ext_row[i] + j for j in range(len(cont) - 1 - e)]
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


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the common prefix of ``a`` and ``b``."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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
