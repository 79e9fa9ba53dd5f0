"""ExpertStore: where experts live, and how the compute module asks for one.

``get(layer, expert)`` returns weights ready to compute and counts what it cost. Two stores
live here: everything in RAM (``InMemoryStore``), and a RAM budget in front of a slower
reader (``CachedStore``), which keeps the most recently used experts and reads the rest
from disk one expert at a time.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from moe_local.experts.weights import ExpertWeights


@dataclass
class LayerStats:
    """Counters of one layer's expert traffic."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_from_ram: int = 0
    bytes_from_disk: int = 0
    io_wait_s: float = 0.0

    def add(self, other: LayerStats) -> None:
        """Add ``other``'s counters to this one."""
        self.hits += other.hits
        self.misses += other.misses
        self.evictions += other.evictions
        self.bytes_from_ram += other.bytes_from_ram
        self.bytes_from_disk += other.bytes_from_disk
        self.io_wait_s += other.io_wait_s


@dataclass
class StoreStats:
    """A snapshot of a store's counters: per layer and in total."""

    layers: dict[int, LayerStats] = field(default_factory=dict)

    @property
    def total(self) -> LayerStats:
        """All layers' counters added up."""
        out = LayerStats()
        for s in self.layers.values():
            out.add(s)
        return out

    @property
    def hit_rate(self) -> float:
        """Fraction of expert requests served without a read (0 when there were none)."""
        t = self.total
        return t.hits / (t.hits + t.misses) if t.hits + t.misses else 0.0

    def minus(self, earlier: StoreStats) -> StoreStats:
        """Return the counters accumulated since ``earlier`` was taken."""
        out = StoreStats()
        for layer, s in self.layers.items():
            e = earlier.layers.get(layer, LayerStats())
            out.layers[layer] = LayerStats(
                s.hits - e.hits,
                s.misses - e.misses,
                s.evictions - e.evictions,
                s.bytes_from_ram - e.bytes_from_ram,
                s.bytes_from_disk - e.bytes_from_disk,
                s.io_wait_s - e.io_wait_s,
            )
        return out


class ExpertStore(ABC):
    """Holds every expert of a model; hands out one (layer, expert) at a time."""

    def __init__(self) -> None:
        self._stats: dict[int, LayerStats] = {}
        self._lock = threading.Lock()

    @abstractmethod
    def get(self, layer: int, expert: int) -> ExpertWeights:
        """Return expert ``expert`` of layer ``layer``, ready to compute."""

    def resident(self, layer: int) -> set[int]:
        """Experts of ``layer`` that ``get`` serves without a read."""
        return set()

    def order(self, layer: int, experts: Iterable[int]) -> list[int]:
        """Order a layer's needed experts so the resident ones are computed first."""
        res = self.resident(layer)
        needed = list(experts)
        return [e for e in needed if e in res] + [e for e in needed if e not in res]

    def layer_stats(self, layer: int) -> LayerStats:
        """The live counters of ``layer`` (created on first use)."""
        s = self._stats.get(layer)
        if s is None:
            s = self._stats[layer] = LayerStats()
        return s

    def stats(self) -> StoreStats:
        """A copy of every layer's counters."""
        with self._lock:
            return StoreStats({k: LayerStats(**vars(v)) for k, v in self._stats.items()})

    def reset_stats(self) -> None:
        """Zero every counter."""
        with self._lock:
            self._stats.clear()

    @property
    def resident_bytes(self) -> int:
        """Bytes of expert weights this store holds in memory now."""
        return 0


class InMemoryStore(ExpertStore):
    """Every expert resident in memory: each ``get`` is a hit."""

    def __init__(self, experts: dict[tuple[int, int], ExpertWeights]) -> None:
        super().__init__()
        self._experts = experts
        self._by_layer: dict[int, set[int]] = {}
        for layer, e in experts:
            self._by_layer.setdefault(layer, set()).add(e)

    def get(self, layer: int, expert: int) -> ExpertWeights:
        """Return the expert; counts a hit."""
        self.layer_stats(layer).hits += 1
        return self._experts[(layer, expert)]

    def resident(self, layer: int) -> set[int]:
        """All experts of the layer."""
        return self._by_layer.get(layer, set())

    @property
    def resident_bytes(self) -> int:
        """Bytes of all experts."""
        return sum(w.nbytes for w in self._experts.values())


ExpertReader = Callable[[int, int], ExpertWeights]


class CachedStore(ExpertStore):
    """A RAM budget of recently used experts in front of a reader (a checkpoint on disk).

    Args:
        reader: reads expert (layer, e) from the slow tier, returning weights it owns.
        budget_bytes: most bytes of experts kept in RAM at once; at least one expert always fits.
    """

    def __init__(self, reader: ExpertReader, budget_bytes: int) -> None:
        super().__init__()
        self._reader = reader
        self.budget_bytes = budget_bytes
        self._cache: OrderedDict[tuple[int, int], ExpertWeights] = OrderedDict()
        self._sizes: dict[tuple[int, int], int] = {}
        self._bytes = 0

    def get(self, layer: int, expert: int) -> ExpertWeights:
        """Return the expert from RAM (a hit) or read it, evicting least recently used ones."""
        key = (layer, expert)
        stats = self.layer_stats(layer)
        self._account_growth()
        w = self._cache.get(key)
        if w is not None:
            self._cache.move_to_end(key)
            stats.hits += 1
            return w
        t0 = time.perf_counter()
        w = self._reader(layer, expert)
        stats.io_wait_s += time.perf_counter() - t0
        size = w.nbytes
        stats.misses += 1
        stats.bytes_from_disk += size
        self._evict_until(self.budget_bytes - size)
        self._cache[key] = w
        self._sizes[key] = size
        self._bytes += size
        return w

    def _account_growth(self) -> None:
        """Re-measure the last used expert: computing it may have built a kernel copy of its weights."""
        if not self._cache:
            return
        key, w = next(reversed(self._cache.items()))
        size = w.nbytes
        if size != self._sizes[key]:
            self._bytes += size - self._sizes[key]
            self._sizes[key] = size
            self._evict_until(self.budget_bytes, keep=key)

    def _evict_until(self, limit: int, keep: tuple[int, int] | None = None) -> None:
        """Evict least recently used experts until at most ``limit`` bytes remain (never ``keep``)."""
        while self._cache and self._bytes > limit:
            old_key = next(iter(self._cache))
            if old_key == keep:
                break
            self._cache.pop(old_key)
            self._bytes -= self._sizes.pop(old_key)
            self.layer_stats(old_key[0]).evictions += 1

    def resident(self, layer: int) -> set[int]:
        """Experts of ``layer`` now in RAM."""
        return {e for (lay, e) in self._cache if lay == layer}

    @property
    def resident_bytes(self) -> int:
        """Bytes of experts now in RAM."""
        return self._bytes
