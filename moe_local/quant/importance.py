"""Importance-weighted rounding for ``rtn`` and ``hqq`` (the "imatrix" idea).

A linear layer's output error for an input ``x`` is ``x @ (W - W_hat).T``; averaged over the
calibration inputs and keeping only the diagonal of their second moment, the expected squared
error of output row ``o`` is ``sum_i E[x_i**2] * (W[o, i] - W_hat[o, i])**2``. So the mean squared
input of each input channel (its *importance*) is the weight a channel's rounding error should
carry. This module

* accumulates that statistic (``ImportanceAccumulator``) during calibration;
* turns it into per-position weights of a group (``group_weights``), normalized to mean 1 and
  floored so a channel no calibration token exercised still counts a little;
* searches a group's scale and zero for the lowest *weighted* error (``weighted_rtn_params``):
  k-quant style, a grid of candidate scales around min/max, each followed by a weighted
  least-squares refit of scale and zero for the codes it gives; the best candidate, rounded to fp16,
  is kept only where it beats plain RTN under the same weighted error.

Nothing here runs unless an importance vector is given: without one ``rtn`` and ``hqq`` are
unchanged bit for bit.
Legend: n=tokens, I=in features, r=rows in a chunk, G=groups per row, g=group size.
"""

from __future__ import annotations

import torch

from moe_local.quant.lsfit import assign_codes, weighted_fit, weighted_sq_error
from moe_local.quant.rtn import (
    DEFAULT_CHUNK_ELEMS,
    FP16_MAX,
    MIN_SCALE,
    ZERO_RANGE,
    QuantParts,
    check_weight,
    quantize_groups,
    rtn_params,
    to_fp16_values,
)
from moe_local.quant.schemes import QType

IMPORTANCE_FLOOR = 0.05  # weight of a channel the calibration never exercised, relative to the mean
GRID_STEPS = 16  # candidate scales tried per group (plus plain RTN's)
GRID_SPAN = 1.0  # the candidates spread the group's range over qmax - SPAN .. qmax + SPAN codes


class ImportanceAccumulator:
    """Running mean of the squared inputs of one linear, per input channel.

    Args:
        in_features: the linear's input width ``I``.
    """

    def __init__(self, in_features: int) -> None:
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` ``[..., I]``."""
        x = x.reshape(-1, x.shape[-1])
        self.sum_sq += x.double().square().sum(dim=0)
        self.count += int(x.shape[0])

    def importance(self) -> torch.Tensor:
        """Mean squared input per channel, ``[I]`` float32 (zeros when nothing was added)."""
        return (self.sum_sq / max(self.count, 1)).float()


def importance_of(inputs: torch.Tensor | ImportanceAccumulator | object) -> torch.Tensor:
    """Mean squared input per channel from calibration inputs.

    Args:
        inputs: tokens ``[n, I]``, an ``ImportanceAccumulator``, or a GPTQ ``HessianAccumulator``
            (whose diagonal is the same statistic).

    Returns:
        ``[I]`` float32.
    """
    if isinstance(inputs, ImportanceAccumulator):
        return inputs.importance()
    if isinstance(inputs, torch.Tensor):
        acc = ImportanceAccumulator(inputs.shape[-1])
        acc.add(inputs)
        return acc.importance()
    return torch.diagonal(inputs.hessian()).float()  # HessianAccumulator


def group_weights(importance: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Per-position rounding weights ``[1, G, g]`` from a channel importance ``[I]``.

    Normalized to mean 1, then ``floor + (1 - floor) * w`` so that no weight is zero.

    Args:
        importance: mean squared input per channel, ``[I]``.
        in_features: the weight's ``I``.
        group_size: ``g``.

    Returns:
        float32 ``[1, I / g, g]``.

    Raises:
        ValueError: a length other than ``I``, or negative / NaN / inf values.
    """
    imp = importance.detach().to(torch.float32).reshape(-1)
    if imp.numel() != in_features:
        raise ValueError(f"importance has {imp.numel()} channels, the weight {in_features} inputs")
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise ValueError("importance must be finite and non-negative")
    mean = float(imp.mean())
    rel = imp / mean if mean > 0 else torch.ones_like(imp)
    w = IMPORTANCE_FLOOR + (1.0 - IMPORTANCE_FLOOR) * rel
    return w.view(1, in_features // group_size, group_size)


def to_fp16_params(
    scale: torch.Tensor, zero: torch.Tensor, absmax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-representable ``(scale, zero)`` keeping the same offset ``-zero * scale`` (as hqq does)."""
    scale32 = torch.maximum(scale, absmax / ZERO_RANGE).clamp_(MIN_SCALE, FP16_MAX)
    scale16 = to_fp16_values(scale32)
    zero16 = to_fp16_values((zero * scale32 / scale16).clamp_(-FP16_MAX, FP16_MAX))
    return scale16, zero16


def weighted_rtn_params(
    wg: torch.Tensor, qmax: int, weight: torch.Tensor, *, steps: int = GRID_STEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and zero per group minimizing the importance-weighted error (grid + refit).

    Args:
        wg: float32 groups ``[r, G, g]``.
        qmax: the largest code.
        weight: ``[1, G, g]`` rounding weights (``group_weights``).
        steps: candidate scales besides min/max.

    Returns:
        ``(scale, zero)`` ``[r, G, 1]`` float32 holding fp16-representable values, never worse than
        plain RTN's under the weighted error, group by group.

    Raises:
        ValueError: when a weight is NaN/inf or a scale does not fit fp16.
    """
    scale0, zero0, absmax = rtn_params(wg, qmax)
    mn = -zero0 * scale0
    span = scale0 * qmax
    rtn_scale = to_fp16_values(scale0)
    rtn_zero = to_fp16_values((zero0 * scale0 / rtn_scale).clamp_(-FP16_MAX, FP16_MAX))
    buf = torch.empty_like(wg)
    best_err = weighted_sq_error(
        wg, assign_codes(wg, rtn_scale, rtn_zero, qmax, out=buf), rtn_scale, rtn_zero, weight
    )
    best_scale, best_zero = rtn_scale, rtn_zero
    for k in range(steps + 1):
        # the group's range spread over qmax - SPAN .. qmax + SPAN codes (above qmax: the top clips)
        levels = qmax - GRID_SPAN + 2.0 * GRID_SPAN * k / max(steps, 1)
        cand_scale = span / levels
        cand_zero = -mn / cand_scale
        q = assign_codes(wg, cand_scale, cand_zero, qmax, out=buf)
        fit_scale, fit_zero, _ = weighted_fit(wg, q, weight, cand_scale, cand_zero)
        scale16, zero16 = to_fp16_params(fit_scale, fit_zero, absmax)
        err = weighted_sq_error(wg, assign_codes(wg, scale16, zero16, qmax, out=buf), scale16, zero16, weight)
        better = err < best_err  # NaN compares False: the earlier candidate stays
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale16, best_scale)
        best_zero = torch.where(better, zero16, best_zero)
    return best_scale, best_zero


def weighted_rtn_quantize(
    w: torch.Tensor, qtype: QType, importance: torch.Tensor, chunk_elems: int = DEFAULT_CHUNK_ELEMS
) -> QuantParts:
    """``rtn_quantize`` with each group's scale and zero searched for the lowest importance-weighted
    error (``weighted_rtn_params``); codes stay nearest-rounded.

    Args:
        w: float weight ``[O, I]``; ``I`` must be divisible by ``qtype.group_size``.
        qtype: the scheme; its ``method`` is ignored.
        importance: mean squared calibration input per input channel, ``[I]``.
        chunk_elems: weights processed at once (bounds the float32 working memory).

    Returns:
        The packed codes, fp16 scales ``[O, G]`` and fp16 zeros ``[O, G]``.

    Raises:
        ValueError: on a malformed weight, NaN/inf values or a bad importance.
    """
    check_weight(w, qtype.group_size)
    weight = group_weights(importance, int(w.shape[1]), qtype.group_size).to(w.device)
    return quantize_groups(
        w, qtype, lambda wg, qmax: weighted_rtn_params(wg, qmax, weight), chunk_elems, weight
    )
