"""CachedStore: a byte budget of experts in fast memory, in front of a slow reader, with prefetch.

The fast tier is RAM on a CPU host (or device memory when experts are copied to a GPU); the
slow tier is a reader (a moe-local folder or a checkpoint on disk, read one expert at a time).
A pluggable policy picks victims. ``prefetch`` reads experts on a background thread; the
results join the cache on the calling thread, so cache structures are never shared.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from moe_local.experts.policy import EvictionPolicy, Key, make_policy
from moe_local.experts.store import ExpertStore
from moe_local.experts.weights import ExpertWeights

ExpertReader = Callable[[int, int], ExpertWeights]
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_freed_memory_to_os() -> None:
    """Make glibc serve large buffers with mmap, so an evicted expert's memory leaves the process.

    Without a fixed threshold glibc raises it after each large free and keeps expert-sized
    buffers in per-thread heaps, and RSS creeps past the budget when a prefetch thread reads.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class CachedStore(ExpertStore):
    """A budget of experts kept in fast memory; the rest read on demand or ahead of need.

    Args:
        reader: reads expert (layer, e) from the slow tier, returning weights it owns.
        budget_bytes: most bytes of experts kept at once; at least one expert always fits.
        policy: ``lru`` (default) or ``lfu``, or an EvictionPolicy.
        prefetch_workers: background reader threads (0 disables prefetch).
    """

    reads_ahead = True

    def __init__(
        self,
        reader: ExpertReader,
        budget_bytes: int,
        policy: str | EvictionPolicy = "lru",
        prefetch_workers: int = 1,
    ) -> None:
        super().__init__()
        return_freed_memory_to_os()
        self._reader = reader
        self.budget_bytes = budget_bytes
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self._cache: dict[Key, ExpertWeights] = {}
        self._sizes: dict[Key, int] = {}
        self._bytes = 0
        self._last: Key | None = None
        self._prefetched: set[Key] = set()  # resident because of a prefetch, not used yet
        self._largest = 0  # bytes of the largest expert read so far: the room a miss makes first
        self._pending: dict[Key, Future[ExpertWeights]] = {}
        self._pool = ThreadPoolExecutor(prefetch_workers, "moe-prefetch") if prefetch_workers > 0 else None

    def get(self, layer: int, expert: int) -> ExpertWeights:
        """Return the expert from the cache (a hit) or read it, evicting by policy."""
        key = (layer, expert)
        stats = self.layer_stats(layer)
        self._account_growth()
        self._join_finished()
        w = self._cache.get(key)
        if w is None and key in self._pending:
            t0 = time.perf_counter()
            w = self._pending.pop(key).result()  # still reading: wait for it
            stats.io_wait_s += time.perf_counter() - t0
            self._insert(key, w)
            self._prefetched.add(key)
        if w is not None:
            stats.hits += 1
            if key in self._prefetched:
                self._prefetched.discard(key)
                stats.prefetch_used += 1
        else:
            # room first: read while the cache is full, a miss would hold the budget plus the
            # expert for a moment, which under a tight cap makes the kernel reclaim (and then
            # read back) the code pages of the process itself
            self._evict_until(self.budget_bytes - self._largest)
            t0 = time.perf_counter()
            w = self._reader(layer, expert)
            stats.io_wait_s += time.perf_counter() - t0
            stats.misses += 1
            stats.bytes_from_disk += w.nbytes
            self._insert(key, w)
        self.policy.touch(key)
        self._last = key
        return w

    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        """Start background reads of the experts of ``layer`` that are neither cached nor pending."""
        if self._pool is None:
            return
        self._join_finished()
        stats = self.layer_stats(layer)
        for e in experts:
            key = (layer, e)
            if key in self._cache or key in self._pending:
                continue
            self._pending[key] = self._pool.submit(self._reader, layer, e)
            stats.prefetched += 1

    def _join_finished(self) -> None:
        """Move finished background reads into the cache (on the calling thread)."""
        for key in [k for k, f in self._pending.items() if f.done()]:
            w = self._pending.pop(key).result()
            self.layer_stats(key[0]).bytes_from_disk += w.nbytes
            self._insert(key, w)
            self._prefetched.add(key)
            self.policy.touch(key)

    def _insert(self, key: Key, w: ExpertWeights) -> None:
        size = w.nbytes
        self._largest = max(self._largest, size)
        self._evict_until(self.budget_bytes - size, protect=(key,))
        self._cache[key] = w
        self._sizes[key] = size
        self._bytes += size

    def _account_growth(self) -> None:
        """Re-measure the last used expert: computing it may have built a kernel copy of its weights."""
        key = self._last
        if key is None or key not in self._cache:
            return
        size = self._cache[key].nbytes
        if size != self._sizes[key]:
            self._bytes += size - self._sizes[key]
            self._sizes[key] = size
            self._evict_until(self.budget_bytes, protect=(key,))

    def _evict_until(self, limit: int, protect: Iterable[Key] = ()) -> None:
        """Evict by policy until at most ``limit`` bytes remain."""
        while self._cache and self._bytes > limit:
            victim = self.policy.victim(protect)
            if victim is None:
                break
            self.policy.remove(victim)
            if victim not in self._cache:
                continue
            del self._cache[victim]
            self._bytes -= self._sizes.pop(victim)
            self._prefetched.discard(victim)
            self.layer_stats(victim[0]).evictions += 1

    def resident(self, layer: int) -> set[int]:
        """Experts of ``layer`` now cached."""
        return {e for (lay, e) in self._cache if lay == layer}

    @property
    def resident_bytes(self) -> int:
        """Bytes of experts now cached."""
        return self._bytes

    def close(self) -> None:
        """Stop the prefetch thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
