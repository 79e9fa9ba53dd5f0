"""Every tested family: moe-local's load equals transformers' own model, logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_local.config import LoadOptions, SamplingParams
from moe_local.experts.cache import CachedStore
from moe_local.experts.module import OffloadedExperts
from moe_local.experts.store import InMemoryStore
from moe_local.generation import generate
from moe_local.loading.loader import load
from tests.conftest import ALL_FAMILIES

REL_TOL = 1e-4  # fp32, relative to the largest logit


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def family_pair(request, tiny_checkpoint):
    folder = tiny_checkpoint(request.param)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, folder, ref


@pytest.mark.parametrize("budget", [None, "one-expert"])
def test_logits_match_transformers(family_pair, budget):
    family, folder, ref = family_pair
    opts = LoadOptions(dtype="float32")
    if budget:
        probe = load(folder, opts)
        one = max(probe.store.get(s.layer, 0).nbytes for s in probe.sites)
        opts = LoadOptions(dtype="float32", expert_memory=one)
    lm = load(folder, opts)
    assert isinstance(lm.store, CachedStore if budget else InMemoryStore)
    assert lm.sites, f"{family}: no experts found"
    assert all(isinstance(lm.model.get_submodule(s.name), OffloadedExperts) for s in lm.sites)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = lm.model(ids).logits
    assert _rel_err(want, got) < REL_TOL
    stats = lm.store.stats().total
    if budget:
        assert stats.misses > 0 and stats.bytes_from_disk > 0
    else:
        assert stats.hits > 0 and stats.misses == 0


def test_greedy_32_tokens_identical(family_pair):
    family, folder, ref = family_pair
    lm = load(folder, LoadOptions(dtype="float32"))
    prompt = lm.tokenizer.encode("The quick brown fox")
    ours = generate(lm, prompt, SamplingParams(max_tokens=32, ignore_eos=True)).tokens
    theirs = ref.generate(
        torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None
    )[0, len(prompt) :].tolist()
    assert len(ours) == 32
    assert ours == theirs, family


def test_inspect_says_each_family_state(tmp_path):
    """inspect names a verified family as such, and says when a family's experts stay in memory."""
    from moe_local.inspection import inspect_model
    from moe_local.tiny import make_tiny_checkpoint

    kimi = inspect_model(make_tiny_checkpoint("kimi_linear", tmp_path / "k")).status
    assert kimi == "supported (verified: exact)"
    doge = inspect_model(make_tiny_checkpoint("doge", tmp_path / "d")).status
    assert doge.startswith("supported (exact") and "stay in memory" in doge
