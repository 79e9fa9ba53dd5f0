"""``ExpertSource``: the one interface every checkpoint format's expert reader implements.

A source reads expert ``(layer, e)`` from disk into canonical ``ExpertWeights`` (``gate_up``
``[2I, H]`` or ``up`` ``[I, H]``, ``down`` ``[H, I]``, optional biases), each part a tensor or a
quantized weight. Stores (``moe_local.experts``) take ``source.read`` as their reader; the
loader sizes budgets with ``expert_nbytes``. Implementations: ``HfExperts`` (Hugging Face
safetensors), ``GptqExperts`` (GPTQ checkpoints), ``BlobExperts`` (moe-local folders).
Legend: E=experts, H=hidden size, I=expert intermediate size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch

from moe_local.experts.sites import ExpertsSite
from moe_local.experts.weights import ExpertWeights


class ExpertSource(ABC):
    """Reads one expert at a time from a checkpoint on disk.

    Attributes:
        dtype: dtype float tensors are cast to as they are read (None: as stored).
        drop_cache: evict read bytes from the page cache after each read (a RAM budget must hold).
        claimed: checkpoint tensor keys that hold experts (so the dense loader skips them);
            empty where experts live in files of their own.
    """

    dtype: torch.dtype | None
    drop_cache: bool
    claimed: set[str]

    def __init__(self, dtype: torch.dtype | None, drop_cache: bool) -> None:
        self.dtype = dtype
        self.drop_cache = drop_cache
        self.claimed = set()

    @abstractmethod
    def read(self, layer: int, expert: int) -> ExpertWeights:
        """Read expert ``expert`` of ``layer`` into canonical weights (the caller owns them)."""

    @abstractmethod
    def expert_nbytes(self, layer: int) -> int:
        """Bytes one expert of ``layer`` occupies once read."""

    def total_nbytes(self, sites: Iterable[ExpertsSite]) -> int:
        """Bytes of every expert of ``sites`` once read."""
        return sum(self.expert_nbytes(s.layer) * s.num_experts for s in sites)
