"""Eviction policies and the trace simulator (LRU, LFU with aging, Belady's optimum)."""

from __future__ import annotations

import random

import pytest

from moe_local.errors import MoeLocalError
from moe_local.experts.policy import LFUPolicy, LRUPolicy, make_policy, simulate


def test_lru_victim_is_oldest_unprotected():
    p = LRUPolicy()
    for k in [(0, 1), (0, 2), (0, 3), (0, 1)]:
        p.touch(k)
    assert p.victim() == (0, 2)
    assert p.victim(protect=[(0, 2)]) == (0, 3)


def test_lfu_prefers_rare_and_ages():
    p = LFUPolicy(half_life=1000)
    for _ in range(5):
        p.touch((0, 1))
    p.touch((0, 2))
    assert p.victim() == (0, 2)
    aging = LFUPolicy(half_life=4)
    for _ in range(8):
        aging.touch((0, 1))  # popular long ago
    for _ in range(12):
        aging.touch((0, 2))  # popular now
    aging.touch((0, 3))
    assert aging.victim(protect=[(0, 3)]) == (0, 1)


def test_belady_is_optimal_and_counts_add_up():
    rng = random.Random(0)
    trace = [(rng.randrange(3), rng.choice([0, 0, 1, 2, 3, 4, 5])) for _ in range(3000)]
    for slots in (1, 4, 9):
        results = {p: simulate(trace, slots, p) for p in ("lru", "lfu", "belady")}
        assert all(h + m == len(trace) for h, m in results.values())
        assert results["belady"][0] >= max(results["lru"][0], results["lfu"][0])
    assert simulate([(0, 1), (0, 2), (0, 1)], 2, "belady") == (1, 2)


def test_unknown_policy():
    with pytest.raises(MoeLocalError, match="lru"):
        make_policy("fifo")
