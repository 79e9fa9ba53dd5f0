"""Importance-weighted rounding: the statistic, the weights, and rtn/hqq searching the weighted error."""

from __future__ import annotations

import pytest
import torch

from moe_local.quant.gptq import HessianAccumulator
from moe_local.quant.hqq import hqq_params, hqq_quantize
from moe_local.quant.importance import (
    IMPORTANCE_FLOOR,
    ImportanceAccumulator,
    group_weights,
    importance_of,
    weighted_rtn_params,
    weighted_rtn_quantize,
    weighted_sq_error,
)
from moe_local.quant.rtn import assign_codes, rtn_fp16_params, rtn_quantize
from moe_local.quant.schemes import parse_qtype
from moe_local.quant.tensor import QuantizedTensor


def _dequant(parts, w, qtype) -> torch.Tensor:
    return (
        QuantizedTensor(parts.packed, parts.scales, parts.zeros, tuple(w.shape), qtype).dequantize().float()
    )


def _inputs(n: int, i: int, seed: int = 0, draw: int = 0) -> torch.Tensor:
    """Calibration-like inputs: a few channels carry most of the energy (as in real activations).

    ``seed`` fixes the channels' scales, ``draw`` the tokens.
    """
    scale = torch.exp(2.0 * torch.randn(i, generator=torch.Generator().manual_seed(seed)))
    return torch.randn(n, i, generator=torch.Generator().manual_seed(1000 + draw)) * scale


def test_accumulator_is_the_mean_square_per_channel():
    x = torch.randn(300, 16)
    acc = ImportanceAccumulator(16)
    acc.add(x[:100])
    acc.add(x[100:].reshape(2, 100, 16))  # any leading shape
    assert acc.count == 300
    torch.testing.assert_close(acc.importance(), x.square().mean(0))
    torch.testing.assert_close(importance_of(x), x.square().mean(0))
    assert importance_of(acc) is not None and torch.equal(
        ImportanceAccumulator(4).importance(), torch.zeros(4)
    )


def test_a_hessian_gives_the_same_importance_up_to_scale():
    x = torch.randn(200, 8)
    h = HessianAccumulator(8)
    h.add(x)
    imp = importance_of(h)
    ratio = imp / x.square().mean(0)
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-4, atol=0)


def test_group_weights_are_normalized_floored_and_checked():
    w = group_weights(torch.tensor([0.0, 1.0, 3.0, 0.0]), 4, 2)
    assert w.shape == (1, 2, 2)
    assert float(w.min()) == pytest.approx(IMPORTANCE_FLOOR)  # an unseen channel still counts
    assert float(w.mean()) == pytest.approx(1.0)
    torch.testing.assert_close(group_weights(torch.zeros(4), 4, 2), torch.ones(1, 2, 2))
    for bad, match in ((torch.ones(3), "channels"), (torch.tensor([1.0, -1, 1, 1]), "non-negative")):
        with pytest.raises(ValueError, match=match):
            group_weights(bad, 4, 2)
    with pytest.raises(ValueError, match="finite"):
        group_weights(torch.tensor([1.0, float("nan"), 1, 1]), 4, 2)


@pytest.mark.parametrize("scheme", ["int4-g32", "int3-g64", "int2-g16"])
def test_weighted_search_never_loses_to_rtn_group_by_group(scheme):
    qt = parse_qtype(scheme)
    torch.manual_seed(1)
    w = torch.randn(24, 128)
    weight = group_weights(_inputs(256, 128).square().mean(0), 128, qt.group_size)
    wg = w.view(24, -1, qt.group_size)
    s0, z0 = rtn_fp16_params(wg, qt.qmax)
    s1, z1 = weighted_rtn_params(wg, qt.qmax, weight)
    for s in (s1, z1):
        torch.testing.assert_close(s, s.half().float())  # fp16-representable
    e0 = weighted_sq_error(wg, assign_codes(wg, s0, z0, qt.qmax), s0, z0, weight)
    e1 = weighted_sq_error(wg, assign_codes(wg, s1, z1, qt.qmax), s1, z1, weight)
    assert bool((e1 <= e0 * (1 + 1e-6)).all())
    assert float(e1.sum()) < 0.95 * float(e0.sum())


@pytest.mark.parametrize("method", ["rtn", "hqq"])
@pytest.mark.parametrize("scheme", ["int4-g64", "int3-g32"])
def test_importance_lowers_the_output_error(method, scheme):
    qt = parse_qtype(scheme + ("-hqq" if method == "hqq" else ""))
    torch.manual_seed(2)
    w = torch.randn(64, 256) * 0.05
    x_cal, x_test = _inputs(512, 256, seed=3), _inputs(512, 256, seed=3, draw=1)  # held-out tokens
    plain_quant = hqq_quantize if method == "hqq" else rtn_quantize
    plain = _dequant(plain_quant(w, qt), w, qt)
    imp = importance_of(x_cal)
    parts = hqq_quantize(w, qt, importance=imp) if method == "hqq" else weighted_rtn_quantize(w, qt, imp)
    weighted = _dequant(parts, w, qt)
    ref = x_test @ w.T
    err_plain = float((x_test @ plain.T - ref).norm())
    err_weighted = float((x_test @ weighted.T - ref).norm())
    assert err_weighted < 0.9 * err_plain, (err_weighted, err_plain)


def test_without_importance_nothing_changes():
    torch.manual_seed(4)
    w = torch.randn(16, 64)
    qt = parse_qtype("int3-g32-hqq")
    a, b = hqq_quantize(w, qt), hqq_quantize(w, qt, importance=None)
    assert a.superscales is None and b.superscales is None
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3], strict=True))


def test_weighted_hqq_never_loses_to_the_weighted_rtn_search():
    qt = parse_qtype("int3-g32-hqq")
    torch.manual_seed(5)
    w = torch.randn(16, 128)
    weight = group_weights(_inputs(128, 128).square().mean(0), 128, 32)
    wg = w.view(16, -1, 32)
    s0, z0 = weighted_rtn_params(wg, qt.qmax, weight)
    s1, z1 = hqq_params(wg, qt.qmax, weight=weight)
    e0 = weighted_sq_error(wg, assign_codes(wg, s0, z0, qt.qmax), s0, z0, weight)
    e1 = weighted_sq_error(wg, assign_codes(wg, s1, z1, qt.qmax), s1, z1, weight)
    assert bool((e1 <= e0 * (1 + 1e-6)).all())


def test_a_bad_importance_is_a_value_error():
    qt = parse_qtype("int4-g32")
    with pytest.raises(ValueError, match="channels"):
        weighted_rtn_quantize(torch.randn(4, 64), qt, torch.ones(32))
    with pytest.raises(ValueError, match="divisible"):
        hqq_quantize(torch.randn(4, 48), parse_qtype("int4-g32-hqq"), importance=torch.ones(48))
