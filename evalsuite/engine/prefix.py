"""Prefix caching: the K/V of finished sequences, kept for later prompts that begin the same way.

A multi-turn conversation sends its whole history again each turn (MT-Bench's second turn is the
first turn's prompt, the model's answer and a new question), and few-shot prompts share their
examples. ``DecodeBatch`` saves each finished sequence's K/V here and, when a new prompt begins
with tokens held here, copies those positions into the new sequence's cache slot and prefills only
the rest (vLLM's automatic prefix caching, with its rule of whole blocks of ``BLOCK`` tokens).

What a reused position holds was computed in an earlier forward: by a prefill, or by a decode
step for the tokens a sequence generated. A prefill of the whole prompt would give the same values
up to rounding (a decode step's product has other shapes than a prefill's), so with reuse a
sequence's numbers can differ from a cold run's in the last bits, as they do in vLLM and
TensorRT-LLM with prefix caching on. ``prefix_cache=False`` (``--no-prefix-cache``) prefills every
prompt whole.

Entries are matched by tokens only; the store belongs to one set of weights and one cache dtype
(``DecodeBatch`` replaces it when either changes) and holds at most ``capacity`` bytes, the least
recently used entries leaving first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor

from .cache import KVCache

BLOCK = 16  # positions are reused in whole blocks of this many tokens, as vLLM's default block size


@dataclass
class Entry:
    tokens: tuple[int, ...]
    k: Tensor  # [layers, kv_heads, len(tokens), head_dim], as the cache stores it
    v: Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the longest common prefix of two token tuples (a binary search over slice
    comparisons, which run in C: MT-Bench looks up 80 prompts of ~250 tokens among ~160 entries)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixStore:
    def __init__(self, key: tuple, capacity: int):
        self.key = key  # (cache dtype, weights fingerprint): what the stored values depend on
        self.capacity = capacity
        self.entries: OrderedDict[tuple[int, ...], Entry] = OrderedDict()
        self.nbytes = 0
        self.stats = {"lookups": 0, "hits": 0, "reused_tokens": 0, "prompt_tokens": 0}

    def match(self, prompt: list[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with ``prompt``, and how many of its positions to
        reuse: whole blocks, leaving at least one prompt token to prefill (its logits give the
        first new token). (None, 0) when no block matches."""
        self.stats["lookups"] += 1
        self.stats["prompt_tokens"] += len(prompt)
        key = tuple(prompt)
        best, best_len = None, 0
        for entry in self.entries.values():
            if entry.tokens[0] != key[0]:
                continue
            n = common_prefix(entry.tokens, key)
            if n > best_len:
                best, best_len = entry, n
        reuse = min(best_len, len(prompt) - 1) // BLOCK * BLOCK
        if reuse == 0:
            return None, 0
        self.entries.move_to_end(best.tokens)
        self.stats["hits"] += 1
        self.stats["reused_tokens"] += reuse
        return best, reuse

    def save(self, tokens: list[int], cache: KVCache, slot: int) -> None:
        """Keep the K/V of ``tokens``, held in the first len(tokens) positions of ``slot``. An entry
        that is a prefix of these tokens is dropped (this one covers it); tokens that an entry
        already covers are not saved again."""
        key = tuple(tokens)
        if len(key) < BLOCK:
            return
        for t in list(self.entries):
            if len(t) >= len(key) and t[:len(key)] == key:
                self.entries.move_to_end(t)
                return
            if len(t) < len(key) and key[:len(t)] == t:
                self._drop(t)
        n = len(key)
        entry = Entry(key, cache.k[:, slot, :, :n].clone(), cache.v[:, slot, :, :n].clone())
        if entry.nbytes > self.capacity:
            return
        self.entries[key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.capacity:
            self._drop(next(iter(self.entries)))

    @staticmethod
    def load(entry: Entry, n: int, cache: KVCache, slot: int) -> None:
        """Copy the entry's first ``n`` positions into ``slot``."""
        cache.k[:, slot, :, :n] = entry.k[:, :, :n]
        cache.v[:, slot, :, :n] = entry.v[:, :, :n]

    def _drop(self, tokens: tuple[int, ...]) -> None:
        self.nbytes -= self.entries.pop(tokens).nbytes


def store_for(model, key: tuple, capacity: int) -> PrefixStore:
    """The model's prefix store for ``key``: the one it holds, with room for at least ``capacity``
    bytes, or a new one (K/V computed with other weights or stored in another dtype are useless)."""
    store = model.__dict__.get("_prefix_store")
    if store is None or store.key != key:
        store = model.__dict__["_prefix_store"] = PrefixStore(key, capacity)
    store.capacity = max(store.capacity, capacity)
    return store



def clear(model) -> PrefixStore | None:
    """Drop the model's prefix store (a benchmark's cold start); returns it, for its stats."""
    return model.__dict__.pop("_prefix_store", None)
