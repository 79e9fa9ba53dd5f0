"""Offloaded generation equals all-in-memory generation, whatever the budget, policy or prefetch."""

from __future__ import annotations

import pytest
import torch

from moe_local.config import LoadOptions, SamplingParams
from moe_local.experts.cache import CachedStore
from moe_local.generation import generate
from moe_local.loading.loader import load

PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)
PROMPT = "the cache holds the experts that the router picks"


@pytest.fixture(scope="module")
def deep_mixtral(tiny_checkpoint):
    # 4 MoE layers of 8 experts, top-2: enough experts for a budget to force misses
    return tiny_checkpoint("mixtral", num_hidden_layers=4, num_local_experts=8)


@pytest.fixture(scope="module")
def reference(deep_mixtral):
    lm = load(deep_mixtral)
    return generate(lm, PROMPT, PARAMS, chat=False).tokens, lm.store.get(0, 0).nbytes


@pytest.mark.parametrize("slots", [1, 4, 8, 16])
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_token_identical(deep_mixtral, reference, slots, prefetch, policy):
    tokens, expert_bytes = reference
    opts = LoadOptions(expert_memory=slots * expert_bytes, prefetch=prefetch, policy=policy)
    lm = load(deep_mixtral, opts)
    assert isinstance(lm.store, CachedStore)
    res = generate(lm, PROMPT, PARAMS, chat=False)
    assert res.tokens == tokens
    stats = res.stats.experts
    assert lm.store.resident_bytes <= slots * expert_bytes
    assert stats.total.misses > 0
    if prefetch:
        assert stats.total.guessed > 0 and 0 <= stats.prefetch_accuracy <= 1
        assert stats.total.prefetched > 0
    else:
        assert stats.total.prefetched == 0 and stats.total.guessed == 0


def test_bigger_cache_misses_less(deep_mixtral, reference):
    _, expert_bytes = reference
    misses = []
    for slots in (2, 8, 32):
        lm = load(deep_mixtral, LoadOptions(expert_memory=slots * expert_bytes, prefetch=False))
        misses.append(generate(lm, PROMPT, PARAMS, chat=False).stats.experts.total.misses)
    assert misses[0] > misses[1] > misses[2]
    assert misses[2] == 32  # everything fits: each expert is read once


@pytest.mark.parametrize("cpu_compute", ["on", "off", "auto"])
@pytest.mark.parametrize("fast_slots", [1, 3])
def test_tiered_store_token_identical(deep_mixtral, reference, cpu_compute, fast_slots):
    tokens, expert_bytes = reference
    opts = LoadOptions(
        expert_memory=fast_slots * expert_bytes, host_memory=6 * expert_bytes, cpu_compute=cpu_compute
    )
    lm = load(deep_mixtral, opts)
    res = generate(lm, PROMPT, PARAMS, chat=False)
    assert res.tokens == tokens
    t = res.stats.experts.total
    assert t.bytes_from_disk > 0  # the host tier holds only 6 of 32 experts
    if cpu_compute == "on":
        assert t.cpu_computed > 0
    if cpu_compute == "off":
        assert t.cpu_computed == 0 and t.bytes_from_ram > 0


def test_offloaded_cpu_load_leaves_a_core_for_reads(tiny_mixtral, monkeypatch):
    from moe_local import env

    monkeypatch.delenv("MOE_LOCAL_THREADS", raising=False)
    monkeypatch.setattr(env, "usable_cores", lambda: 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        load(tiny_mixtral, LoadOptions(expert_memory=1 << 16, prefetch=False))
        assert torch.get_num_threads() == 4  # nothing streams in the background
        load(tiny_mixtral, LoadOptions(expert_memory=1 << 16))
        assert torch.get_num_threads() == 3
        torch.set_num_threads(4)
        monkeypatch.setenv("MOE_LOCAL_THREADS", "4")  # the user's choice wins
        load(tiny_mixtral, LoadOptions(expert_memory=1 << 16))
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
