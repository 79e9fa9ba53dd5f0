"""ExpertStore: where experts live, and how the compute module asks for one.

``get(layer, expert)`` returns weights ready to compute and counts what it cost. This module
holds the interface, the counters and ``InMemoryStore`` (every expert resident); the budgeted
cache in front of a disk reader is ``moe_local.experts.cache.CachedStore``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
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
    prefetched: int = 0  # experts read ahead of need
    prefetch_used: int = 0  # of those, used before being evicted
    guessed: int = 0  # experts the next-layer router guess named
    guessed_right: int = 0  # of those, actually routed
    cpu_computed: int = 0  # device misses computed on the CPU from host RAM instead of moved

    def add(self, other: LayerStats) -> None:
        """Add ``other``'s counters to this one."""
        self.hits += other.hits
        self.misses += other.misses
        self.evictions += other.evictions
        self.bytes_from_ram += other.bytes_from_ram
        self.bytes_from_disk += other.bytes_from_disk
        self.io_wait_s += other.io_wait_s
        self.prefetched += other.prefetched
        self.prefetch_used += other.prefetch_used
        self.guessed += other.guessed
        self.guessed_right += other.guessed_right
        self.cpu_computed += other.cpu_computed


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
    def prefetch_accuracy(self) -> float:
        """Fraction of guessed experts that were routed (0 when nothing was guessed)."""
        t = self.total
        return t.guessed_right / t.guessed if t.guessed else 0.0

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
            out.layers[layer] = LayerStats(**{f: getattr(s, f) - getattr(e, f) for f in vars(s)})
        return out


class ExpertStore(ABC):
    """Holds every expert of a model; hands out one (layer, expert) at a time.

    The whole contract ``OffloadedExperts`` relies on, per layer and step:

    1. ``check_guess(layer, routed)`` scores the guess made one layer earlier;
    2. ``note_guess``/``prefetch`` for the next layer's guessed experts (stores that read ahead);
    3. ``order(layer, needed)``: resident experts first, so reads overlap their compute;
    4. for each expert, ``compute_on_host(layer, e, tokens)`` may return host weights to compute
       on the CPU (a miss cheaper to compute where it lies than to copy); otherwise ``get``.

    Attributes:
        reads_ahead: True when the store reads from a slower tier, so prefetching helps.
    """

    reads_ahead: bool = False

    def __init__(self) -> None:
        self._stats: dict[int, LayerStats] = {}
        self._guesses: dict[int, set[int]] = {}
        self._lock = threading.Lock()

    @abstractmethod
    def get(self, layer: int, expert: int) -> ExpertWeights:
        """Return expert ``expert`` of layer ``layer``, ready to compute."""

    def resident(self, layer: int) -> set[int]:
        """Experts of ``layer`` that ``get`` serves without a read."""
        return set()

    def order(self, layer: int, experts: Iterable[int], resident: set[int] | None = None) -> list[int]:
        """Order a layer's needed experts so the resident ones are computed first.

        Args:
            layer: the layer.
            experts: its needed experts.
            resident: ``resident(layer)`` when the caller has it already (not computed twice).
        """
        res = self.resident(layer) if resident is None else resident
        needed = list(experts)
        return [e for e in needed if e in res] + [e for e in needed if e not in res]

    def prefetch(self, layer: int, experts: Iterable[int]) -> None:  # noqa: B027 - optional hook
        """Start reading ``experts`` of ``layer`` in the background (a no-op for stores holding all)."""

    def compute_on_host(self, layer: int, expert: int, tokens: int) -> ExpertWeights | None:
        """Host weights to compute this expert on the CPU instead of ``get`` (None: use ``get``).

        Args:
            layer: the layer.
            expert: the expert.
            tokens: tokens routed to it in this step.
        """
        return None

    def note_guess(self, layer: int, guessed: set[int]) -> None:
        """Remember which experts of ``layer`` were guessed (and prefetched) ahead of it."""
        self._guesses[layer] = guessed

    def check_guess(self, layer: int, routed: set[int]) -> None:
        """Count how many of the experts guessed for ``layer`` were actually routed."""
        guessed = self._guesses.pop(layer, None)
        if guessed:
            s = self.layer_stats(layer)
            s.guessed += len(guessed)
            s.guessed_right += len(guessed & routed)

    def layer_stats(self, layer: int) -> LayerStats:
        """The live counters of ``layer`` (created on first use)."""
        s = self._stats.get(layer)
        if s is None:
            with self._lock:  # stats() may be iterating on another thread (a server's /metrics)
                s = self._stats.setdefault(layer, LayerStats())
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
