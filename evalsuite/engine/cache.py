"""A preallocated KV cache: one row ("slot") per running sequence, positions 0..max_len-1."""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """K and V for every layer, shaped [layers, slots, kv_heads, max_len, head_dim].

    Each slot holds one sequence from position 0, so positions in the cache are the sequence's
    true positions (no left padding): a sequence gives the same attention alone or in a batch.
    Attention reads only the first ``kv_len`` positions of the slots of the running batch.
    """

    def __init__(self, cfg: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if num_slots <= 0 or max_len <= 0:
            raise ValueError(f"KVCache needs positive slots and length, got {num_slots} and {max_len}")
        shape = (cfg.num_layers, num_slots, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_len = num_slots, max_len

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst`` (batch compaction)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
