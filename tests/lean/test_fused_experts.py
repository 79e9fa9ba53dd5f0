"""A decode token's resident experts (quantized or bf16) in one native call: the loop's values, to the bit."""

from __future__ import annotations

import pytest
import torch

from moe_local.config import LoadOptions
from moe_local.convert.writer import quantize_checkpoint
from moe_local.experts.module import OffloadedExperts
from moe_local.loading.loader import load
from moe_local.quant import native
from moe_local.recipes import load_recipe

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory):
    # rows of whole 64-code chunks, so the experts run on the native kernel
    src = tiny_checkpoint("mixtral", hidden_size=128, intermediate_size=128)
    out = tmp_path_factory.mktemp("q") / "experts-4bit"
    quantize_checkpoint(src, out, load_recipe("experts-4bit"))
    return out


def _tokens_equal_the_loop(experts: OffloadedExperts, seed: int, monkeypatch) -> int:
    """Three tokens through ``decode_token`` equal ``forward`` (the loop); how many fused calls ran."""
    calls = []
    fused = native.experts_bf16
    monkeypatch.setattr(native, "experts_bf16", lambda *a: calls.append(1) or fused(*a))
    gen = torch.Generator().manual_seed(seed)
    for ids in ([0, 1], [3, 2], [1, 3]):
        x = torch.randn(1, 128, generator=gen).bfloat16()
        weights = torch.softmax(torch.randn(2, generator=gen), -1)
        with torch.inference_mode():
            got = experts.decode_token(x, ids, weights)
            reference = experts(x, torch.tensor([ids]), weights[None])  # forward: the loop
        assert torch.equal(got, reference)
    return len(calls)


@pytest.mark.parametrize("budget", [None, "two experts"])
def test_fused_token_equals_the_loop(quantized, budget, monkeypatch):
    lm = load(quantized, LoadOptions(dtype="bfloat16"))
    if budget:
        one = max(w.nbytes for w in [lm.store.get(0, e) for e in range(4)])
        lm = load(quantized, LoadOptions(dtype="bfloat16", expert_memory=2 * one + one // 2))
    experts = next(m for m in lm.model.modules() if isinstance(m, OffloadedExperts))
    calls = _tokens_equal_the_loop(experts, 0, monkeypatch)
    if budget is None:
        assert calls == 3  # every expert resident: one native call per token
    else:
        assert calls == 0  # each token's experts were read from disk: the loop, one read each


@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_experts_take_the_same_single_call(tiny_checkpoint, threads, monkeypatch):
    lm = load(
        tiny_checkpoint("mixtral", hidden_size=128, intermediate_size=128), LoadOptions(dtype="bfloat16")
    )
    experts = next(m for m in lm.model.modules() if isinstance(m, OffloadedExperts))
    assert lm.store.get(experts.layer, 0).gate_up.dtype is torch.bfloat16  # plain matrices, not codes
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _tokens_equal_the_loop(experts, threads, monkeypatch) == 3
    finally:
        torch.set_num_threads(before)


def test_rows_call_refuses_indices_outside_it(quantized):
    lm = load(quantized, LoadOptions(dtype="bfloat16"))
    experts = next(m for m in lm.model.modules() if isinstance(m, OffloadedExperts))
    from moe_local.experts.module import _native_pair

    pair = _native_pair(lm.store.get(experts.layer, 0))
    x = torch.zeros(2, 128, dtype=torch.bfloat16)
    weights = torch.ones(2, 1)
    assert native.experts_rows_bf16(x, [pair], [[0, 1]], [[0], [1]], weights).shape == (2, 128)
    with pytest.raises(ValueError, match="outside the call"):
        native.experts_rows_bf16(x, [pair], [[0, 2]], [[0], [1]], weights)  # no row 2
    with pytest.raises(ValueError, match="outside the call"):
        native.experts_rows_bf16(x, [pair], [[0, 1]], [[0], [2]], weights)  # no pair 2
    with pytest.raises(ValueError, match="same experts and rows"):
        native.experts_rows_bf16(x, [pair], [[0, 1]], [[0]], weights)
