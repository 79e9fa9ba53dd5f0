"""Samplers and logits processors."""

from __future__ import annotations

import torch

from moe_local.sampling import make_logits_processors, make_sampler

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])


def test_greedy():
    assert make_sampler(0.0)(LOGITS) == 1


def test_top_k_one_and_tiny_top_p_are_greedy():
    assert all(make_sampler(1.0, top_k=1, seed=s)(LOGITS) == 1 for s in range(20))
    assert all(make_sampler(1.0, top_p=0.01, seed=s)(LOGITS) == 1 for s in range(20))


def test_top_k_limits_support():
    seen = {make_sampler(5.0, top_k=2, seed=s)(LOGITS) for s in range(200)}
    assert seen == {1, 2}


def test_min_p_limits_support():
    # p(2)/p(1) = e^-1 = 0.37 passes min_p 0.3; p(0)/p(1) = e^-2 = 0.14 does not
    seen = {make_sampler(1.0, min_p=0.3, seed=s)(LOGITS) for s in range(200)}
    assert seen == {1, 2}


def test_distribution_follows_temperature():
    sampler = make_sampler(1.0, seed=0)
    counts = torch.bincount(torch.tensor([sampler(LOGITS) for _ in range(3000)]), minlength=5).float()
    expected = torch.softmax(LOGITS, -1) * 3000
    assert torch.allclose(counts, expected, rtol=0.15, atol=25)


def test_repetition_penalty():
    (proc,) = make_logits_processors(repetition_penalty=2.0)
    out = proc([1, 4], LOGITS)
    assert out[1] == 1.5 and out[4] == -2.0 and out[2] == 2.0


def test_presence_and_frequency_penalties():
    (proc,) = make_logits_processors(presence_penalty=0.5, frequency_penalty=0.25)
    out = proc([2, 2, 0], LOGITS)
    assert torch.allclose(out, torch.tensor([1.0 - 0.75, 3.0, 2.0 - 1.0, 0.5, -1.0]))
    assert make_logits_processors() == []


def test_extreme_temperature_is_greedy_and_degenerate_logits_are_safe():
    assert make_sampler(1e-40, seed=0)(LOGITS) == 1
    weird = torch.tensor([float("inf"), 1.0, float("nan")])
    assert make_sampler(1.0, seed=0)(weird) in (0, 1, 2)
