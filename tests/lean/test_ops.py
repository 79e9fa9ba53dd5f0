"""The lean decode step's native operations give the values of the torch code they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import (
    MixtralRMSNorm,
    MixtralTopKRouter,
    apply_rotary_pos_emb,
)

from moe_local.lean import ops

pytestmark = pytest.mark.skipif(not ops.available(), reason="no native operations on this machine")


@pytest.mark.parametrize("width", [32, 1000, 4096])
def test_rmsnorm_matches_transformers_to_one_bf16_step(width):
    gen = torch.Generator().manual_seed(width)
    norm = MixtralRMSNorm(width, eps=1e-5).to(torch.bfloat16)
    norm.weight.data = (1 + torch.randn(width, generator=gen)).bfloat16()
    x = (3 * torch.randn(1, width, generator=gen)).bfloat16()
    want = norm(x)[0]
    got = ops.rmsnorm(x[0], norm.weight.data, norm.variance_epsilon)
    # the float32 sum of squares runs in another order: at most one bf16 step apart, nearly all equal
    assert (got.float() - want.float()).abs().max() <= 2 * want.float().abs().max() * 2**-8
    assert (got != want).float().mean() < 0.02


@pytest.mark.parametrize(("heads", "dim"), [(4, 8), (8, 128), (2, 64)])
def test_rope_is_bit_identical_to_transformers(heads, dim):
    gen = torch.Generator().manual_seed(dim)
    q = torch.randn(1, heads, 1, dim, generator=gen).bfloat16()
    angle = torch.rand(dim // 2, generator=gen) * 50
    angle = torch.cat([angle, angle])
    cos, sin = angle.cos().bfloat16()[None, None], angle.sin().bfloat16()[None, None]  # [1, 1, D]
    want, _ = apply_rotary_pos_emb(q, q, cos, sin)
    got = ops.rope_(q[0, :, 0].clone(), cos[0, 0], sin[0, 0])
    assert torch.equal(got, want[0, :, 0])


@pytest.mark.parametrize(
    ("hq", "hkv", "length", "dim"),
    [(8, 2, 1, 64), (8, 2, 37, 128), (4, 4, 300, 64), (6, 1, 5, 64), (12, 2, 9, 40), (16, 2, 700, 128)],
)  # groups of 4, 1 and 6 heads per KV head; head sizes past and short of the 32-wide blocks; threaded
def test_attention_equals_float32_sdpa_to_one_rounding(hq, hkv, length, dim):
    gen = torch.Generator().manual_seed(length)
    capacity = length + 7  # positions past ``length`` hold garbage the call must not read
    q = torch.randn(hq, dim, generator=gen).bfloat16()
    k = torch.randn(hkv, capacity, dim, generator=gen).bfloat16()
    v = torch.randn(hkv, capacity, dim, generator=gen).bfloat16()
    k[:, length:] = float("nan")
    want = F.scaled_dot_product_attention(
        q[None, :, None].float(), k[None, :, :length].float(), v[None, :, :length].float(), enable_gqa=True
    )[0, :, 0].reshape(-1)  # [Hq * D] float32
    got = ops.attend(q, k, v, length, dim**-0.5, torch.empty(ops.scores_size(hq, hkv, length)))
    assert torch.isfinite(got.float()).all()
    assert (got.float() - want).abs().max() <= want.abs().max() * 2**-7  # one bf16 rounding, plus order


@pytest.mark.parametrize(("experts", "top_k"), [(4, 2), (8, 2), (64, 6)])
def test_router_picks_transformers_experts_and_weights(experts, top_k):
    class Config:
        num_experts_per_tok, num_local_experts, hidden_size = top_k, experts, 256

    router = MixtralTopKRouter(Config()).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(experts)
    router.weight.data = torch.randn(experts, 256, generator=gen).bfloat16() * 0.1
    mine = ops.Router(router.weight.data, top_k, renormalize=True)
    for _ in range(20):
        h = torch.randn(1, 256, generator=gen).bfloat16()
        logits, want_w, _ = router(h)
        ids, weights = mine(h[0])
        # bf16 logits tie often among many experts; torch.topk orders ties its own way, the native
        # router takes the lower id first: the same weights, and a valid top-k of the same logits
        assert torch.allclose(weights, want_w[0], rtol=1e-6, atol=0)
        probs = logits.float().softmax(-1)[0]
        chosen = probs[ids]
        assert len(set(ids)) == top_k
        assert chosen.min() >= max((p for e, p in enumerate(probs.tolist()) if e not in ids), default=0)
        assert (chosen[:-1] >= chosen[1:]).all()


def test_misshapen_inputs_are_refused_not_read():
    x = torch.randn(4, 8).bfloat16()
    with pytest.raises(ValueError, match="contiguous bfloat16"):
        ops.rope_(x.t(), torch.ones(4).bfloat16(), torch.zeros(4).bfloat16())  # a transposed view
    with pytest.raises(ValueError, match="contiguous bfloat16"):
        ops.rmsnorm(x.float(), torch.ones(8).bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="norm weight"):
        ops.rmsnorm(x, torch.ones(7).bfloat16(), 1e-6)
    k = torch.randn(2, 5, 8).bfloat16()
    with pytest.raises(ValueError, match="attention shapes"):
        ops.attend(x, k, k, 6, 1.0, torch.empty(8))  # more positions than the cache holds
    with pytest.raises(ValueError, match="not routable"):
        ops.Router(torch.randn(4, 8).bfloat16(), 5, renormalize=True)
