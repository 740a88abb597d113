"""Prefix caching (engine.prefix): a prompt that begins with an earlier sequence's tokens reuses
their K/V and still generates what transformers generates for the whole prompt."""

from __future__ import annotations

import pytest
import torch

from evalsuite.engine.cache import KVCache
from evalsuite.engine.generate import generate
from evalsuite.engine.prefix import BLOCK, PrefixStore
from evalsuite.engine.requests import SamplingParams

from .test_generate import _hf_greedy, swapped_down_proj

# 40 tokens: two whole blocks of 16 and 8 more
FIRST = [5, 17, 33, 2, 90, 11, 7, 8, 100, 200, 300, 41, 42, 43, 44, 45, 46, 47, 48, 49,
         61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80]


@pytest.fixture
def fresh_store(tiny):
    tiny.model.__dict__.pop("_prefix_store", None)
    tiny.model.__dict__.pop("_kept_decode", None)
    yield
    tiny.model.__dict__.pop("_prefix_store", None)
    tiny.model.__dict__.pop("_kept_decode", None)


@pytest.mark.parametrize("static", [False, True])
def test_second_turn_reuses_the_first_and_generates_what_transformers_does(tiny, hf_tiny, fresh_store, static):
    """A second turn: the first prompt, the model's 30-token answer and 10 new tokens. Its first 64
    positions (the answer's first 29 tokens were fed to the model, the 30th never was: 40 + 29 = 69
    stored, 64 in whole blocks) come from the first turn's cache; the tokens are transformers'."""
    first = generate(tiny.model, [FIRST], SamplingParams(max_new_tokens=30), static=static)[0]
    assert first.tokens == _hf_greedy(hf_tiny, FIRST, 30)
    store = tiny.model.__dict__["_prefix_store"]
    assert len(store.blocks) == 4  # 69 positions fed: 4 whole blocks
    second = FIRST + first.tokens + [300, 41, 42, 43, 44, 45, 46, 47, 48, 49]
    # a prompt sharing only FIRST's first 20 tokens reuses one block
    other = FIRST[:20] + [9, 10, 11, 12, 13, 14, 15]
    got = generate(tiny.model, [second, other], SamplingParams(max_new_tokens=20), static=static)
    assert store.stats["reused_tokens"] == 64 + 16 and store.stats["hits"] == 2
    assert [g.tokens for g in got] == [_hf_greedy(hf_tiny, second, 20), _hf_greedy(hf_tiny, other, 20)]
    # shared blocks are stored once: the 4 above, second's 2 more (99 positions fed), other's 1 more
    assert len(store.blocks) == 7


def test_prompts_sharing_a_prefix_in_one_call_compute_it_once(tiny, hf_tiny, fresh_store):
    """Five few-shot-like prompts: a 50-token prefix and their own questions, joining together.
    The first computes the prefix; the other four wait for it and reuse its 3 whole blocks."""
    shared = (FIRST + FIRST)[:50]
    prompts = [shared + [100 + i, 7, 8, 9 + i] for i in range(5)]
    got = generate(tiny.model, prompts, SamplingParams(max_new_tokens=6))
    store = tiny.model.__dict__["_prefix_store"]
    assert store.stats["hits"] == 4 and store.stats["reused_tokens"] == 4 * 48
    assert sorted(g.cached_tokens for g in got) == [0, 48, 48, 48, 48]
    assert [g.tokens for g in got] == [_hf_greedy(hf_tiny, p, 6) for p in prompts]


def test_without_prefix_cache_nothing_is_stored_or_reused(tiny, hf_tiny, fresh_store):
    generate(tiny.model, [FIRST], SamplingParams(max_new_tokens=5), prefix_cache=False)
    assert "_prefix_store" not in tiny.model.__dict__
    generate(tiny.model, [FIRST], SamplingParams(max_new_tokens=5))
    store = tiny.model.__dict__["_prefix_store"]
    got = generate(tiny.model, [FIRST + [7]], SamplingParams(max_new_tokens=5), prefix_cache=False)
    assert store.stats["lookups"] == 1 and got[0].tokens == _hf_greedy(hf_tiny, FIRST + [7], 5)


def test_changed_weights_start_an_empty_store(tiny, fresh_store):
    generate(tiny.model, [FIRST], SamplingParams(max_new_tokens=5))
    store = tiny.model.__dict__["_prefix_store"]
    with swapped_down_proj(tiny.model):
        generate(tiny.model, [FIRST + [7]], SamplingParams(max_new_tokens=5))
        assert tiny.model.__dict__["_prefix_store"] is not store
        assert tiny.model.__dict__["_prefix_store"].stats["hits"] == 0


def _cache_with(cfg, rows: list[list[int]]) -> KVCache:
    """A cache whose slot i holds the value rows[i][p] (and its negative in V) at position p."""
    cache = KVCache(cfg, len(rows), 64, torch.float32)
    for i, row in enumerate(rows):
        cache.k[:, i, :, :len(row)] = torch.tensor(row, dtype=torch.float32)[:, None]
        cache.v[:, i, :, :len(row)] = -torch.tensor(row, dtype=torch.float32)[:, None]
    return cache


def test_store_walks_whole_blocks_shares_them_and_evicts_tails_first(tiny):
    cfg = tiny.model.config
    a, b, c, d = list(range(1, 41)), list(range(1, 21)) + [99] * 20, [7] * 40, [8] * 48
    cache = _cache_with(cfg, [a, b, c, d])
    block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * BLOCK * cfg.head_dim * 4
    store = PrefixStore(key=(), capacity=5 * block_bytes)
    store.save(a, cache, 0)  # 40 tokens: 2 whole blocks
    store.save(b, cache, 1)  # its first block is a's: 1 more
    assert len(store.blocks) == 3 and store.nbytes == 3 * block_bytes
    blocks, n = store.match(a[:38] + [5, 5])
    assert n == 32
    # a prompt no longer than the stored blocks leaves its last token to prefill
    assert store.match(a[:33])[1] == 32 and store.match(a[:32])[1] == 16 and store.match(b[:17])[1] == 16
    assert store.match(b + [1])[1] == 32  # its second block is its own
    assert store.match([2, 3, 4] * 10) == ([], 0)
    dst = KVCache(cfg, 1, 64, torch.float32)
    PrefixStore.load(blocks, dst, 0)
    assert torch.equal(dst.k[0, 0, 0, :n, 0], torch.arange(1.0, 33.0))
    assert torch.equal(dst.v[0, 0, 0, :n, 0], -torch.arange(1.0, 33.0)) and not dst.k[:, 0, :, n:].any()
    store.save(c, cache, 2)  # 5 blocks: full
    store.save(d, cache, 3)  # 3 more: the 3 least recently used leave, tails before heads
    assert store.nbytes == 5 * block_bytes
    assert store.match(b + [1]) == ([], 0) and store.match(a)[1] == 0
    assert store.match(c + [1])[1] == 32 and store.match(d + [1])[1] == 48
