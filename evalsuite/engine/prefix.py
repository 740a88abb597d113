"""Prefix caching: K/V kept for later prompts that begin with the same tokens.

A multi-turn conversation sends its whole history again each turn (MT-Bench's second turn is the
first turn's prompt, the model's answer and a new question), and few-shot prompts share their
examples. ``DecodeBatch`` keeps each prompt's K/V here once it is prefilled, and a finished
sequence's with its generated tokens; a new prompt that begins with stored blocks gets them
copied into its cache slot and prefills only the rest (vLLM's automatic prefix caching, in whole
blocks of ``BLOCK`` tokens). Joining prompts that begin alike wait for the first of them, so a
shared few-shot prefix is computed once (``DecodeBatch.add``).

What a reused position holds was computed in an earlier forward: another prompt's prefill, or a
decode step for the tokens a sequence generated. A prefill of the whole prompt would give the
same values up to rounding (its products have other shapes), so with reuse a sequence's numbers
can differ from a cold run's in the last bits, as they do in vLLM and TensorRT-LLM with prefix
caching on. ``prefix_cache=False`` (``--no-prefix-cache``) prefills every prompt whole.

The store belongs to one set of weights and one cache dtype (``DecodeBatch`` replaces it when
either changes) and holds at most ``capacity`` bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from .cache import KVCache

BLOCK = 16  # positions are reused in whole blocks of this many tokens, as vLLM's default block size


@dataclass
class Block:
    id: int
    k: Tensor  # [layers, kv_heads, BLOCK, head_dim], as the cache stores it
    v: Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PrefixStore:
    """K/V in blocks of ``BLOCK`` positions, each keyed by the previous block's id and its own
    tokens. A block is reached only by walking a prompt's blocks from the first, so a key stands
    for its whole prefix, and sequences that share a prefix share its blocks (vLLM's chain of block
    hashes, with exact keys for hashes). Least recently used blocks leave first; a walk touches
    its chain from the last block back to the first, so a chain loses its tail before its head."""

    def __init__(self, key: tuple, capacity: int):
        self.key = key  # (cache dtype, weights fingerprint): what the stored values depend on
        self.capacity = capacity
        self.blocks: OrderedDict[tuple[int, tuple[int, ...]], Block] = OrderedDict()
        self.nbytes = 0
        self._ids = 0
        self.stats = {"lookups": 0, "hits": 0, "reused_tokens": 0, "prompt_tokens": 0}

    def _walk(self, tokens: list[int], blocks: int) -> list[tuple[int, tuple[int, ...]]]:
        """Keys of the stored blocks that begin ``tokens``, at most ``blocks`` of them."""
        keys, parent = [], -1
        for i in range(blocks):
            key = (parent, tuple(tokens[i * BLOCK:(i + 1) * BLOCK]))
            block = self.blocks.get(key)
            if block is None:
                break
            keys.append(key)
            parent = block.id
        return keys

    def _touch(self, keys: list) -> None:
        for key in reversed(keys):
            self.blocks.move_to_end(key)

    def match(self, prompt: list[int]) -> tuple[list[Block], int]:
        """The stored blocks that begin ``prompt`` and how many positions they hold, leaving at
        least one prompt token to prefill (its logits give the first new token)."""
        self.stats["lookups"] += 1
        self.stats["prompt_tokens"] += len(prompt)
        keys = self._walk(prompt, (len(prompt) - 1) // BLOCK)
        if not keys:
            return [], 0
        self._touch(keys)
        self.stats["hits"] += 1
        self.stats["reused_tokens"] += len(keys) * BLOCK
        return [self.blocks[k] for k in keys], len(keys) * BLOCK

    def save(self, tokens: list[int], cache: KVCache, slot: int) -> None:
        """Keep the K/V of ``tokens``' whole blocks, held in the first positions of ``slot``; the
        blocks already stored are only touched."""
        full = len(tokens) // BLOCK
        keys = self._walk(tokens, full)
        parent = self.blocks[keys[-1]].id if keys else -1
        for i in range(len(keys), full):
            span = slice(i * BLOCK, (i + 1) * BLOCK)
            block = Block(self._ids, cache.k[:, slot, :, span].clone(), cache.v[:, slot, :, span].clone())
            self._ids += 1
            key = (parent, tuple(tokens[span]))
            self.blocks[key] = block
            self.nbytes += block.nbytes
            keys.append(key)
            parent = block.id
        self._touch(keys)
        while self.nbytes > self.capacity and self.blocks:
            self.nbytes -= self.blocks.popitem(last=False)[1].nbytes

    @staticmethod
    def load(blocks: list[Block], cache: KVCache, slot: int) -> None:
        """Copy ``blocks`` into the first positions of ``slot``."""
        n = len(blocks) * BLOCK
        cache.k[:, slot, :, :n] = torch.cat([b.k for b in blocks], dim=2)
        cache.v[:, slot, :, :n] = torch.cat([b.v for b in blocks], dim=2)


def shares_a_block(a: list[int], b: list[int]) -> bool:
    """Whether two prompts begin with the same whole block, and ``b`` has a token after it."""
    return len(a) >= BLOCK and len(b) > BLOCK and a[:BLOCK] == b[:BLOCK]


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
