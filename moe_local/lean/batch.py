"""Sequences decoded together by the lean step: each keeps its own cache, no padding, no mask.

The interface of ``moe_local.batching.DecodeBatch`` (``join`` after a prefill, ``step``, ``leave``),
for a model ``LeanDecoder`` computes. A step runs every sequence's newest token through each weight
once (``LeanDecoder.step_rows``: the projections read their weights once for up to 4 rows, each
expert once for every row routed to it), while attention runs per sequence over its own cache, so
each sequence's logits are those of decoding it alone (``tests/lean/test_batch.py``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch

from moe_local.lean.cache import LeanCache
from moe_local.lean.decoder import LeanDecoder


class LeanBatch:
    """The sequences decoding together, each with its ``LeanCache``.

    Args:
        decoder: the model's lean decoder (``LeanDecoder.build``).
    """

    def __init__(self, decoder: LeanDecoder) -> None:
        self.decoder = decoder
        self._caches: dict[Hashable, LeanCache] = {}

    def __len__(self) -> int:
        return len(self._caches)

    def join(self, key: Hashable, cache: object, length: int) -> None:
        """Add a prefilled sequence: its prompt's ``DynamicCache`` of ``length`` tokens, copied once."""
        if key in self._caches:
            raise ValueError(f"sequence {key!r} is already in the batch")
        mine = self.decoder.new_cache()
        mine.fill_from(cache)
        if mine.length != length:
            raise ValueError(f"sequence {key!r} has {mine.length} cached tokens, not {length}")
        self._caches[key] = mine

    def leave(self, key: Hashable) -> None:
        """Drop a sequence and its cache."""
        del self._caches[key]

    def step(self, tokens: Mapping[Hashable, int]) -> dict[Hashable, torch.Tensor]:
        """Feed each sequence its newest token; return each one's next logits [V] (float32, CPU)."""
        keys = list(self._caches)
        with torch.inference_mode():
            logits = self.decoder.step_rows([tokens[k] for k in keys], [self._caches[k] for k in keys])
        logits = logits.float()  # [B, V]
        return {k: logits[i] for i, k in enumerate(keys)}
