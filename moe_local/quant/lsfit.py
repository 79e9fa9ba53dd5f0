"""What rtn, hqq, importance weighting and the super-block grid share for a group's parameters: the
nearest codes, the (weighted) squared error and the least-squares scale and zero for fixed codes
(a module of its own: each of them imports it, it imports none of them).

Legend: r=rows in a chunk, G=groups per row, g=group size.
"""

from __future__ import annotations

import torch


def weighted_fit(
    wg: torch.Tensor, q: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted least-squares ``(scale, zero)`` for fixed codes ``q``; fallback where degenerate.

    Solves ``min sum weight * (W - (q * slope + offset))**2`` per group in float64.

    Args:
        wg: float32 groups ``[r, G, g]``.
        q: float32 codes ``[r, G, g]``.
        weight: ``[1, G, g]`` positive weights.
        scale: fallback scale ``[r, G, 1]`` (kept where fewer than two distinct codes or slope <= 0).
        zero: fallback zero ``[r, G, 1]``.

    Returns:
        ``(scale, zero, ok)``: float32 params and where the fit was used.
    """
    wq = q * weight
    s_w = weight.sum(dim=-1, keepdim=True).double()
    s_q = wq.sum(dim=-1, keepdim=True).double()
    s_qq = (wq * q).sum(dim=-1, keepdim=True).double()
    s_x = (wg * weight).sum(dim=-1, keepdim=True).double()
    s_qx = (wq * wg).sum(dim=-1, keepdim=True).double()
    det = s_w * s_qq - s_q * s_q
    ok = det > 1e-9 * s_w * s_qq
    slope = (s_w * s_qx - s_q * s_x) / torch.where(ok, det, torch.ones_like(det))
    ok &= slope > 0
    slope = torch.where(ok, slope, scale.double())
    offset = (s_x - slope * s_q) / s_w  # W_hat = q * slope + offset
    new_zero = (-offset / slope).float()
    return torch.where(ok, slope.float(), scale), torch.where(ok, new_zero, zero), ok


def assign_codes(
    wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Nearest codes for given params: ``clamp(round(W * (1 / scale) + zero), 0, qmax)``.

    Args:
        wg: float32 groups ``[r, G, g]``.
        scale: ``[r, G, 1]`` float32.
        zero: ``[r, G, 1]`` float32.
        qmax: the largest code.
        out: optional float32 buffer shaped like ``wg``.

    Returns:
        The codes as float32 ``[r, G, g]`` (``out`` when given).
    """
    q = torch.mul(wg, scale.reciprocal(), out=out) if out is not None else wg * scale.reciprocal()
    return q.add_(zero).round_().clamp_(0, qmax)


def weighted_sq_error(
    wg: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Weighted squared error per group, ``sum(weight * (W - (q - zero) * scale)**2)``, ``[r, G, 1]``."""
    d = (q - zero).mul_(scale).sub_(wg)
    return d.square_().mul_(weight).sum(dim=-1, keepdim=True)
