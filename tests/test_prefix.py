"""Prefix caching (engine.prefix): a prompt that begins with an earlier sequence's tokens reuses
their K/V and still generates what transformers generates for the whole prompt."""

from __future__ import annotations

import pytest
import torch

from evalsuite.engine.cache import KVCache
from evalsuite.engine.generate import generate
from evalsuite.engine.prefix import BLOCK, PrefixStore, common_prefix
from evalsuite.engine.requests import SamplingParams

# 40 tokens: two whole blocks of 16 and 8 more
FIRST = [5, 17, 33, 2, 90, 11, 7, 8, 100, 200, 300, 41, 42, 43, 44, 45, 46, 47, 48, 49,
         61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80]


def _hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


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
    assert [len(t) for t in store.entries] == [69]
    second = FIRST + first.tokens + [300, 41, 42, 43, 44, 45, 46, 47, 48, 49]
    # a prompt sharing only FIRST's first 20 tokens reuses one block
    other = FIRST[:20] + [9, 10, 11, 12, 13, 14, 15]
    got = generate(tiny.model, [second, other], SamplingParams(max_new_tokens=20), static=static)
    assert store.stats["reused_tokens"] == 64 + 16 and store.stats["hits"] == 2
    assert [g.tokens for g in got] == [_hf_greedy(hf_tiny, second, 20), _hf_greedy(hf_tiny, other, 20)]
    # the second turn's sequence covers the first's entry, which is dropped
    assert sorted(len(t) for t in store.entries) == [len(other) + 19, len(second) + 19]


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
    layer = tiny.model.model.layers[0].mlp
    original = layer.down_proj
    layer.down_proj = torch.nn.Linear(original.in_features, original.out_features, bias=False,
                                      dtype=original.weight.dtype)
    try:
        layer.down_proj.weight.data.copy_(original.weight)
        generate(tiny.model, [FIRST + [7]], SamplingParams(max_new_tokens=5))
        assert tiny.model.__dict__["_prefix_store"] is not store
        assert tiny.model.__dict__["_prefix_store"].stats["hits"] == 0
    finally:
        layer.down_proj = original


def _cache_with(cfg, rows: list[list[float]]) -> KVCache:
    """A cache whose slot i holds the value rows[i][p] at every element of position p."""
    cache = KVCache(cfg, len(rows), 64, torch.float32)
    for i, row in enumerate(rows):
        cache.k[:, i, :, :len(row)] = torch.tensor(row)[:, None]
        cache.v[:, i, :, :len(row)] = -torch.tensor(row)[:, None]
    return cache


def test_store_matches_whole_blocks_keeps_the_longest_and_evicts_the_oldest(tiny):
    cfg = tiny.model.config
    a, b, c = list(range(1, 41)), list(range(1, 21)) + [99] * 20, [7] * 40
    cache = _cache_with(cfg, [[float(t) for t in s] for s in (a, b, c)])
    per_entry = 2 * cfg.num_layers * cfg.num_kv_heads * 40 * cfg.head_dim * 4
    store = PrefixStore(key=(), capacity=2 * per_entry)
    store.save(a, cache, 0)
    store.save(b, cache, 1)
    store.save(a[:30], cache, 0)  # covered by a: not stored again
    assert [len(t) for t in store.entries] == [40, 40] and store.nbytes == 2 * per_entry
    # 38 tokens shared with a (36 in whole blocks... of 16: 32), 20 with b: a wins
    entry, n = store.match(a[:38] + [5, 5])
    assert entry.tokens == tuple(a) and n == 32
    # a prompt no longer than the match leaves its last token to prefill
    assert store.match(a[:33])[1] == 32 and store.match(a[:32])[1] == 16
    assert store.match([2, 3, 4] * 10) == (None, 0)
    dst = KVCache(cfg, 1, 64, torch.float32)
    PrefixStore.load(entry, n, dst, 0)
    assert torch.equal(dst.k[0, 0, 0, :n, 0], torch.arange(1.0, 33.0))
    assert torch.equal(dst.v[0, 0, 0, :n, 0], -torch.arange(1.0, 33.0)) and not dst.k[:, 0, :, n:].any()
    # a was used last: c's arrival evicts b, the least recently used
    store.save(c, cache, 2)
    assert set(store.entries) == {tuple(a), tuple(c)} and store.nbytes == 2 * per_entry
    # a longer continuation of a replaces it, and c, now the oldest, leaves to make room
    store.save(a + [50] * 8, cache, 0)
    assert [len(t) for t in store.entries] == [48] and store.nbytes == per_entry * 48 // 40
    assert store.stats["hits"] == 3 and BLOCK == 16


@pytest.mark.parametrize("a,b,n", [((), (1,), 0), ((1, 2, 3), (1, 2, 3), 3), ((1, 2, 3, 4), (1, 2, 5), 2),
                                   ((9,), (1,), 0), (tuple(range(100)), tuple(range(77)) + (0,), 77)])
def test_common_prefix(a, b, n):
    assert common_prefix(a, b) == n
