"""The lean decode step's keys and values: preallocated bf16 buffers, filled once from the prompt's cache.

Legend: Hkv key/value heads, D head size.
"""

from __future__ import annotations

import torch


class LeanCache:
    """Keys and values of every layer in preallocated bf16 buffers [Hkv, capacity, D], grown by doubling.

    Args:
        layers: decoder layers.
        kv_heads: key/value heads.
        head_dim: D.
        capacity: positions to make room for at first.
        limit: the most positions it ever grows to by doubling (the model's context; a request past
            it still gets room, exactly as much as it asks for).
    """

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, capacity: int, limit: int | None = None
    ) -> None:
        self.length = 0
        self.limit = limit
        shape = (kv_heads, max(capacity, 16), head_dim)
        self.keys = [torch.empty(shape, dtype=torch.bfloat16) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=torch.bfloat16) for _ in range(layers)]

    @property
    def capacity(self) -> int:
        """Positions the buffers hold."""
        return self.keys[0].shape[1]

    def reserve(self, positions: int) -> None:
        """Make room for ``positions`` positions (copying into buffers twice as large when needed)."""
        if positions <= self.capacity:
            return
        size = 2 * self.capacity if self.limit is None else min(2 * self.capacity, self.limit)
        size = max(positions, size)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = torch.empty((old.shape[0], size, old.shape[2]), dtype=old.dtype)
                new[:, : self.length] = old[:, : self.length]
                buffers[i] = new

    def fill_from(self, cache) -> None:
        """Copy a transformers ``DynamicCache`` (after the prompt's forward) into the buffers."""
        length = cache.get_seq_length()
        self.reserve(length + 1)
        for i, layer in enumerate(cache.layers):
            self.keys[i][:, :length] = layer.keys[0]
            self.values[i][:, :length] = layer.values[0]
        self.length = length
