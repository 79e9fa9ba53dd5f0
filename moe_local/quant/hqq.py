"""Calibration-free optimized quantization in the spirit of HQQ (Badri & Shaji, 2023).

HQQ models the quantization error as sparse and heavy-tailed: it minimizes an lp-norm (p < 1) of
``W - W_hat`` by half-quadratic splitting, alternating

* ``E = shrink_p(W - W_hat)``: the proximal (generalized soft-threshold) step that keeps only the
  outlier part of the error, ``shrink_p(x) = sign(x) * relu(|x| - |x|**(p - 1) / beta)``;
* ``zero = mean(q - (W - E) / scale)``: the closed-form zero point fitting the inlier part;

with ``beta`` growing by ``kappa`` each iteration. This module runs that loop for every group at once
(vectorized over a chunk of rows), with three changes aimed at the L2 error that matters downstream:

1. ``beta`` is expressed in code units (the residual divided by the scale), so the result does not
   depend on the weights' magnitude, and the per-group iterate with the lowest L2 error is kept;
2. a least-squares polish then alternates (Lloyd-style) between refitting scale and zero in closed
   form for fixed codes and re-assigning the nearest codes; each step can only lower the L2 error;
3. after rounding the params to fp16, each group keeps whichever of (RTN, optimized) params gives the
   lower L2 error, so the result is never worse than RTN group by group.

Given an importance (``moe_local.quant.importance``: the calibration inputs' mean square per input
channel), every error above becomes the importance-weighted one and the zero update a weighted
mean; the importance-weighted RTN search is a third candidate. Without one nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_local.quant.importance import (
    group_weights,
    to_fp16_params,
    weighted_rtn_params,
    weighted_sq_error,
)
from moe_local.quant.lsfit import weighted_fit
from moe_local.quant.rtn import (
    DEFAULT_CHUNK_ELEMS,
    FP16_MAX,
    MIN_SCALE,
    ZERO_RANGE,
    QuantParts,
    assign_codes,
    check_weight,
    group_sq_error,
    quantize_groups,
    rtn_params,
    to_fp16_values,
)
from moe_local.quant.schemes import QType

# Shapes: [r, G, g] a chunk of rows viewed as groups, [r, G, 1] per-group params.
# Legend: r=rows in a chunk, G=groups per row, g=group size.


@dataclass(frozen=True)
class HqqConfig:
    """Parameters of the HQQ-style optimization.

    Attributes:
        lp_norm: the p of the lp-norm error model, in (0, 1). 0.5 (default) runs on ``rsqrt``; other
            values need ``pow``, about 1.6x slower overall for the same result (HQQ's paper uses 0.7).
        beta: initial half-quadratic penalty, in code units (larger: fewer residuals count as outliers).
        kappa: factor ``beta`` grows by each iteration (>= 1).
        iters: maximum half-quadratic iterations (zero-point updates).
        polish_iters: maximum least-squares scale/zero refits.
        tol: early stop when an iteration lowers the chunk's L2 error by less than this fraction.
        chunk_elems: weights optimized at once (bounds the float32 working memory).
    """

    lp_norm: float = 0.5
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    polish_iters: int = 6
    tol: float = 1e-3
    chunk_elems: int = DEFAULT_CHUNK_ELEMS

    def __post_init__(self) -> None:
        if not 0.0 < self.lp_norm < 1.0:
            raise ValueError(f"lp_norm must be in (0, 1), got {self.lp_norm}")
        if self.beta <= 0.0 or self.kappa < 1.0:
            raise ValueError(f"beta must be > 0 and kappa >= 1, got beta={self.beta}, kappa={self.kappa}")
        if self.iters < 0 or self.polish_iters < 0:
            raise ValueError(f"iters and polish_iters must be >= 0, got {self.iters}, {self.polish_iters}")
        if not 0.0 <= self.tol < 1.0:
            raise ValueError(f"tol must be in [0, 1), got {self.tol}")
        if self.chunk_elems < 1:
            raise ValueError(f"chunk_elems must be >= 1, got {self.chunk_elems}")


def _half_quadratic_zero(
    wg: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmax: int,
    cfg: HqqConfig,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Refine the zero points with lp-shrinkage half-quadratic steps; return each group's best (L2) zero.

    ``weight`` ``[1, G, g]`` (optional) weights the L2 error and the zero's mean by position.
    """
    w_sum = None if weight is None else weight.sum(dim=-1, keepdim=True)
    u = wg * scale.reciprocal()  # [r, G, g] weights in code units
    v = torch.empty_like(u)
    q = torch.empty_like(u)
    a = torch.empty_like(u)
    t = torch.empty_like(u)
    best_zero = zero.clone()
    best_err = torch.full_like(zero, float("inf"))
    prev_total = float("inf")
    beta = cfg.beta
    for _ in range(cfg.iters):
        torch.add(u, zero, out=v)
        torch.round(v, out=q).clamp_(0, qmax)
        v.sub_(q)  # residual r = W / scale + zero - q, in code units
        if weight is None:
            err = torch.linalg.vector_norm(v, dim=-1, keepdim=True).square_()
        else:
            err = (v * v).mul_(weight).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_zero = torch.where(better, zero, best_zero)
        best_err = torch.where(better, err, best_err)
        total = float(err.sum())
        if total > prev_total * (1.0 - cfg.tol):
            break
        prev_total = total
        # r - shrink_p(r) = sign(r) * min(|r|, |r|**(p - 1) / beta): the inlier part the zero must absorb
        torch.abs(v, out=a)
        if cfg.lp_norm == 0.5:
            torch.rsqrt(a, out=t)
        else:
            torch.pow(a, cfg.lp_norm - 1.0, out=t)
        t.mul_(1.0 / beta)
        torch.minimum(a, t, out=t).copysign_(v)
        if weight is None:
            zero = zero - t.mean(dim=-1, keepdim=True)
        else:
            zero = zero - t.mul_(weight).sum(dim=-1, keepdim=True) / w_sum
        beta *= cfg.kappa
    return best_zero


def _weighted_polish(
    wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, cfg: HqqConfig, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_least_squares_polish`` under the importance-weighted L2 error."""
    q = torch.empty_like(wg)
    prev_total = float("inf")
    for _ in range(cfg.polish_iters):
        assign_codes(wg, scale, zero, qmax, out=q)
        scale, zero, _ok = weighted_fit(wg, q, weight, scale, zero)
        total = float(
            weighted_sq_error(wg, assign_codes(wg, scale, zero, qmax, out=q), scale, zero, weight).sum()
        )
        if total > prev_total * (1.0 - cfg.tol):
            break
        prev_total = total
    return scale, zero


def _least_squares_polish(
    wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, cfg: HqqConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternate nearest-code assignment and a closed-form L2 refit of (scale, zero) per group."""
    n = wg.shape[-1]
    q = torch.empty_like(wg)
    prod = torch.empty_like(wg)
    sum_w = wg.sum(dim=-1, keepdim=True).double()
    sum_ww = torch.linalg.vector_norm(wg, dim=-1, keepdim=True).double().square_()
    prev_total = float("inf")
    for _ in range(cfg.polish_iters):
        assign_codes(wg, scale, zero, qmax, out=q)
        # q holds small integers, so these fp32 sums are exact; the solve runs in float64.
        sum_q = q.sum(dim=-1, keepdim=True).double()
        sum_qq = torch.linalg.vector_norm(q, dim=-1, keepdim=True).double().square_()
        sum_qw = torch.mul(q, wg, out=prod).sum(dim=-1, keepdim=True).double()
        det = n * sum_qq - sum_q * sum_q
        ok = det > 0.5  # at least two distinct codes; det is an integer here
        slope = (n * sum_qw - sum_q * sum_w) / det.clamp(min=1.0)
        ok &= slope > 0
        slope = torch.where(ok, slope, scale.double())
        offset = (sum_w - slope * sum_q) / n  # W_hat = q * slope + offset
        err = sum_ww - 2 * slope * sum_qw - 2 * offset * sum_w + slope.square() * sum_qq
        err += 2 * slope * offset * sum_q + n * offset.square()
        total = float(err.sum())
        new_scale = slope.float()
        new_zero = (-offset / slope).float()
        scale = torch.where(ok, new_scale, scale)
        zero = torch.where(ok, new_zero, zero)
        if total > prev_total * (1.0 - cfg.tol):
            break
        prev_total = total
    return scale, zero


def hqq_params(
    wg: torch.Tensor, qmax: int, config: HqqConfig | None = None, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimized fp16 scale and zero for a chunk of groups, never worse (L2) than RTN per group.

    Args:
        wg: float32 groups ``[r, G, g]``.
        qmax: the largest code, ``2**bits - 1``.
        config: optimization parameters (default ``HqqConfig()``).
        weight: optional importance weights ``[1, G, g]`` (``importance.group_weights``): every
            error is then weighted, and the result is never worse than importance-weighted RTN.

    Returns:
        ``(scale, zero)`` ``[r, G, 1]`` float32 holding fp16-representable values.

    Raises:
        ValueError: when a weight is NaN/inf or a scale does not fit fp16.
    """
    cfg = config or HqqConfig()
    if weight is not None:
        return _weighted_hqq_params(wg, qmax, cfg, weight)
    scale, zero, absmax = rtn_params(wg, qmax)
    buf = torch.empty_like(wg)
    # RTN baseline, rounded to fp16 the same way rtn_fp16_params does.
    rtn_scale = to_fp16_values(scale)
    rtn_zero = to_fp16_values((zero * scale / rtn_scale).clamp_(-FP16_MAX, FP16_MAX))
    rtn_err = group_sq_error(wg, assign_codes(wg, rtn_scale, rtn_zero, qmax, out=buf), rtn_scale, rtn_zero)

    if cfg.iters:
        zero = _half_quadratic_zero(wg, scale, zero, qmax, cfg)
    if cfg.polish_iters:
        scale, zero = _least_squares_polish(wg, scale, zero, qmax, cfg)

    scale32 = torch.maximum(scale, absmax / ZERO_RANGE).clamp_(MIN_SCALE, FP16_MAX)
    scale = to_fp16_values(scale32)
    zero = to_fp16_values((zero * scale32 / scale).clamp_(-FP16_MAX, FP16_MAX))  # same offset, fp16 scale
    err = group_sq_error(wg, assign_codes(wg, scale, zero, qmax, out=buf), scale, zero)
    better = err < rtn_err  # NaN compares False: RTN wins
    return torch.where(better, scale, rtn_scale), torch.where(better, zero, rtn_zero)


def _weighted_hqq_params(
    wg: torch.Tensor, qmax: int, cfg: HqqConfig, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hqq_params`` under the importance-weighted error; never worse than weighted RTN's search."""
    scale, zero, absmax = rtn_params(wg, qmax)
    if cfg.iters:
        zero = _half_quadratic_zero(wg, scale, zero, qmax, cfg, weight)
    if cfg.polish_iters:
        scale, zero = _weighted_polish(wg, scale, zero, qmax, cfg, weight)
    scale, zero = to_fp16_params(scale, zero, absmax)
    buf = torch.empty_like(wg)
    err = weighted_sq_error(wg, assign_codes(wg, scale, zero, qmax, out=buf), scale, zero, weight)
    base_scale, base_zero = weighted_rtn_params(wg, qmax, weight)
    base_err = weighted_sq_error(
        wg, assign_codes(wg, base_scale, base_zero, qmax, out=buf), base_scale, base_zero, weight
    )
    better = err < base_err  # NaN compares False: the weighted RTN search wins
    return torch.where(better, scale, base_scale), torch.where(better, zero, base_zero)


def hqq_quantize(
    w: torch.Tensor, qtype: QType, config: HqqConfig | None = None, importance: torch.Tensor | None = None
) -> QuantParts:
    """Quantize ``w`` with HQQ-style optimized scale and zero points.

    Args:
        w: float weight ``[O, I]``; ``I`` must be divisible by ``qtype.group_size``.
        qtype: the scheme; its ``method`` is ignored.
        config: optimization parameters (default ``HqqConfig()``).
        importance: optional mean squared calibration input per input channel, ``[I]``
            (``moe_local.quant.importance``); None (default) is calibration-free HQQ.

    Returns:
        The packed codes, fp16 scales ``[O, G]`` and fp16 zeros ``[O, G]``.

    Raises:
        ValueError: on a malformed weight, NaN/inf values or a bad importance.
    """
    cfg = config or HqqConfig()
    if importance is None:
        return quantize_groups(w, qtype, lambda wg, qmax: hqq_params(wg, qmax, cfg), cfg.chunk_elems)
    check_weight(w, qtype.group_size)
    weight = group_weights(importance, int(w.shape[1]), qtype.group_size).to(w.device)
    return quantize_groups(
        w, qtype, lambda wg, qmax: hqq_params(wg, qmax, cfg, weight), cfg.chunk_elems, weight
    )
