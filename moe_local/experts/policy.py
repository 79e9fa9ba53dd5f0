"""Eviction policies for expert caches, and Belady's optimum for comparison on a recorded trace.

A policy only ranks keys; the cache decides when to evict. Keys are (layer, expert).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Sequence

Key = tuple[int, int]


class EvictionPolicy(ABC):
    """Ranks cached keys: ``victim`` names the one to evict next."""

    @abstractmethod
    def touch(self, key: Key) -> None:
        """Record a use of ``key`` (a hit, or an insert after a miss)."""

    @abstractmethod
    def remove(self, key: Key) -> None:
        """Forget ``key`` (it was evicted)."""

    @abstractmethod
    def victim(self, protect: Iterable[Key] = ()) -> Key | None:
        """The key to evict next, never one in ``protect``; None when every key is protected."""


class LRUPolicy(EvictionPolicy):
    """Evict the least recently used expert."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        """Move ``key`` to the most recent end."""
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        """Forget ``key``."""
        self._order.pop(key, None)

    def victim(self, protect: Iterable[Key] = ()) -> Key | None:
        """The oldest unprotected key."""
        keep = set(protect)
        return next((k for k in self._order if k not in keep), None)


class LFUPolicy(EvictionPolicy):
    """Evict the least frequently used expert; counts halve every ``half_life`` uses (aging).

    Aging lets an expert that was popular long ago leave, which plain LFU never allows.
    """

    def __init__(self, half_life: int = 256) -> None:
        self.half_life = half_life
        self._count: dict[Key, float] = {}
        self._last: dict[Key, int] = {}
        self._clock = 0

    def touch(self, key: Key) -> None:
        """Count a use of ``key``."""
        self._clock += 1
        if self._clock % self.half_life == 0:
            for k in self._count:
                self._count[k] /= 2
        self._count[key] = self._count.get(key, 0.0) + 1
        self._last[key] = self._clock

    def remove(self, key: Key) -> None:
        """Forget ``key``."""
        self._count.pop(key, None)
        self._last.pop(key, None)

    def victim(self, protect: Iterable[Key] = ()) -> Key | None:
        """The least used unprotected key (ties: the least recent)."""
        keep = set(protect)
        cands = [k for k in self._count if k not in keep]
        return min(cands, key=lambda k: (self._count[k], self._last[k])) if cands else None


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    """Make a policy by name (``lru`` or ``lfu``)."""
    from moe_local.errors import MoeLocalError

    if name not in POLICIES:
        raise MoeLocalError(f"unknown cache policy {name!r}; choose {', '.join(POLICIES)}")
    return POLICIES[name]()


def simulate(trace: Sequence[Key], slots: int, policy: str) -> tuple[int, int]:
    """Replay ``trace`` through a cache of ``slots`` experts; return (hits, misses).

    Args:
        trace: expert uses in order.
        slots: cache capacity in experts (global across layers).
        policy: ``lru``, ``lfu`` or ``belady`` (the optimum: evict the key used furthest in the future).
    """
    if policy == "belady":
        return _belady(trace, slots)
    pol = make_policy(policy)
    cached: set[Key] = set()
    hits = misses = 0
    for key in trace:
        if key in cached:
            hits += 1
        else:
            misses += 1
            if len(cached) >= slots:
                v = pol.victim()
                cached.discard(v)
                pol.remove(v)
            cached.add(key)
        pol.touch(key)
    return hits, misses


def _belady(trace: Sequence[Key], slots: int) -> tuple[int, int]:
    import heapq

    nxt = [0] * len(trace)
    last: dict[Key, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        nxt[i] = last.get(trace[i], len(trace) + i)  # never again: furthest of all
        last[trace[i]] = i
    cached: dict[Key, int] = {}  # key -> its next use
    heap: list[tuple[int, Key]] = []  # (-next use, key), lazily invalidated
    hits = misses = 0
    for i, key in enumerate(trace):
        if key in cached:
            hits += 1
        else:
            misses += 1
            if len(cached) >= slots:
                while True:
                    neg, k = heapq.heappop(heap)
                    if cached.get(k) == -neg:
                        del cached[k]
                        break
        cached[key] = nxt[i]
        heapq.heappush(heap, (-nxt[i], key))
    return hits, misses
