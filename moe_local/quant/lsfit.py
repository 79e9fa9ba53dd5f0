"""Least-squares scale and zero of a group for fixed codes, the refit rtn, hqq and the super-block
grid share (a module of its own: each of them imports it, it imports none of them).

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
