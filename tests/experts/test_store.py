"""ExpertStore implementations: hits, misses, LRU eviction under a byte budget, stats."""

from __future__ import annotations

import torch

from moe_local.experts.cache import CachedStore
from moe_local.experts.store import InMemoryStore
from moe_local.experts.weights import ExpertWeights


def _expert(v: float) -> ExpertWeights:
    return ExpertWeights(down=torch.full((4, 8), v), gate_up=torch.full((16, 4), v))


ONE = _expert(0).nbytes  # 96 floats


def test_in_memory_store_counts_hits():
    store = InMemoryStore({(0, 0): _expert(0), (0, 1): _expert(1)})
    assert float(store.get(0, 1).down[0, 0]) == 1
    assert store.resident(0) == {0, 1}
    assert store.stats().total.hits == 1 and store.stats().hit_rate == 1.0
    assert store.resident_bytes == 2 * ONE


def test_cached_store_lru():
    reads = []

    def reader(layer, e):
        reads.append((layer, e))
        return _expert(e)

    store = CachedStore(reader, budget_bytes=2 * ONE)
    for key in [(0, 0), (0, 1), (0, 0), (0, 2), (0, 1), (0, 0)]:
        assert float(store.get(*key).down[0, 0]) == key[1]
    # (0,0) miss, (0,1) miss, (0,0) hit, (0,2) miss evicts (0,1), (0,1) miss evicts (0,0), (0,0) miss
    assert reads == [(0, 0), (0, 1), (0, 2), (0, 1), (0, 0)]
    t = store.stats().total
    assert (t.hits, t.misses, t.evictions) == (1, 5, 3)
    assert t.bytes_from_disk == 5 * ONE
    assert store.resident_bytes <= 2 * ONE
    assert store.order(0, [2, 0, 1]) == [0, 1, 2]  # resident (0 and 1) first


def test_stats_minus_and_reset():
    store = CachedStore(lambda layer, e: _expert(e), budget_bytes=ONE)
    store.get(0, 0)
    before = store.stats()
    store.get(1, 0)
    store.get(1, 0)
    delta = store.stats().minus(before)
    assert delta.layers[1].misses == 1 and delta.layers[1].hits == 1
    assert delta.layers[0].misses == 0
    store.reset_stats()
    assert store.stats().total.misses == 0
