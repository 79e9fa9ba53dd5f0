"""Super-block scales (k-quant style): each group's scale and offset as 8-bit codes.

A scheme named with a ``k`` after its group size (``int4-g32k``, ``int3-g16k-hqq``) stores, instead
of an fp16 scale and an fp16 zero per group, an unsigned 8-bit scale code and a signed 8-bit offset
code per group, under one fp16 pair ``(d, dm)`` per super-block of ``SUPERBLOCK_WEIGHTS`` weights
of a row (``[O, S, 2]``; the row's last super-block may hold fewer groups). The group's parameters
are defined by the codes, and computed from them the same way at quantize and at load time:

    scale  = fp16(d * scale_code)                   scale_code in 1..255
    offset = dm * offset_code                       offset_code in -127..127
    zero   = fp16(offset / scale)                   so W_hat = (q - zero) * scale ~ q * scale - offset

So small groups (16 or 32 weights, whose fp16 pair would cost 1-2 bits per weight) cost 0.5-1 bit
plus ``32 / SUPERBLOCK_WEIGHTS``. In memory the expanded fp16 scale and zero are what every kernel
reads; the codes are recovered from them exactly (checked when a weight is built from stored codes)
when the weight is saved, so they are not held twice.

Legend: r=rows, G=groups per row, S=super-blocks per row (ceil(G / n)), n=groups per super-block.
"""

from __future__ import annotations

import torch

from moe_local.quant.lsfit import assign_codes, weighted_fit, weighted_sq_error

SUPERBLOCK_WEIGHTS = 256  # weights of a row under one (d, dm) pair: 8 groups of 32, 16 of 16
SCALE_CODE_MAX = 255
OFFSET_CODE_MAX = 127
SUPER_OVERHEAD_BITS = 32  # the fp16 d and dm of each super-block
CODE_OVERHEAD_BITS = 16  # the two 8-bit codes of each group
_TINY = 2.0**-24  # smallest positive fp16


def groups_per_superblock(group_size: int) -> int:
    """Groups under one ``(d, dm)`` pair: ``SUPERBLOCK_WEIGHTS / group_size`` (at least 1)."""
    return max(1, SUPERBLOCK_WEIGHTS // group_size)


def superblocks(n_groups: int, group_size: int) -> int:
    """Super-blocks per row of ``n_groups`` groups (the last may be partial)."""
    n = groups_per_superblock(group_size)
    return -(-n_groups // n)


def _per_group(sup: torch.Tensor, n: int, n_groups: int) -> torch.Tensor:
    """``[r, S]`` -> ``[r, G]`` float32: each super-block's value repeated over its groups."""
    return sup.float().repeat_interleave(n, dim=1)[:, :n_groups]


def _block_max(values: torch.Tensor, n: int) -> torch.Tensor:
    """``[r, G]`` -> ``[r, S]``: the max of each super-block's groups (a partial last block padded)."""
    r, g = values.shape
    pad = (-g) % n
    if pad:
        values = torch.cat([values, values.new_zeros(r, pad)], dim=1)
    return values.view(r, -1, n).amax(dim=-1)


def expand(
    scale_codes: torch.Tensor, offset_codes: torch.Tensor, sup: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups' fp16 ``(scale, zero)`` ``[r, G]`` from their codes and super-block pairs.

    Args:
        scale_codes: ``[r, G]`` uint8, 1..255.
        offset_codes: ``[r, G]`` int8.
        sup: ``[r, S, 2]`` fp16 ``(d, dm)``.
        group_size: the scheme's group size.

    Returns:
        ``(scale, zero)`` fp16 ``[r, G]``.
    """
    n_groups = scale_codes.shape[1]
    n = groups_per_superblock(group_size)
    d = _per_group(sup[..., 0], n, n_groups)
    dm = _per_group(sup[..., 1], n, n_groups)
    scale = (d * scale_codes.float()).clamp_(min=_TINY).to(torch.float16)
    offset = dm * offset_codes.float()
    zero = (offset / scale.float()).clamp_(-65504.0, 65504.0).to(torch.float16)
    return scale, zero


def quantize_params(
    scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes and super-block pairs nearest to given per-group parameters.

    Args:
        scale: ``[r, G]`` positive (any float dtype).
        zero: ``[r, G]`` zero points in code units.
        group_size: the scheme's group size.

    Returns:
        ``(scale_codes uint8 [r, G], offset_codes int8 [r, G], sup fp16 [r, S, 2])``.
    """
    scale, zero = scale.float(), zero.float()
    n = groups_per_superblock(group_size)
    d = (_block_max(scale, n) / SCALE_CODE_MAX).clamp_(min=_TINY).to(torch.float16)
    dm = (_block_max((zero * scale).abs(), n) / OFFSET_CODE_MAX).to(torch.float16)
    sup = torch.stack([d, dm], dim=-1)
    return (*codes_on(scale, zero, sup, group_size), sup)


def codes_on(
    scale: torch.Tensor, zero: torch.Tensor, sup: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes nearest to per-group ``(scale, zero)`` under given super-block pairs ``sup``.

    Args:
        scale: ``[r, G]`` (any float dtype).
        zero: ``[r, G]`` zero points in code units.
        sup: ``[r, S, 2]`` fp16 ``(d, dm)``.
        group_size: the scheme's group size.

    Returns:
        ``(scale_codes uint8 [r, G], offset_codes int8 [r, G])``.
    """
    n_groups = scale.shape[1]
    n = groups_per_superblock(group_size)
    d = _per_group(sup[..., 0], n, n_groups).clamp(min=_TINY)
    dm = _per_group(sup[..., 1], n, n_groups)
    offset = zero.float() * scale.float()
    scale_codes = (scale.float() / d).round_().clamp_(1, SCALE_CODE_MAX).to(torch.uint8)
    offset_codes = torch.where(dm > 0, offset / dm.clamp(min=_TINY), torch.zeros_like(offset))
    offset_codes = offset_codes.round_().clamp_(-OFFSET_CODE_MAX, OFFSET_CODE_MAX).to(torch.int8)
    return scale_codes, offset_codes


def recover_codes(
    scale: torch.Tensor, zero: torch.Tensor, sup: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes that ``expand`` turned into ``(scale, zero)`` (exact wherever ``exact_recovery`` holds).

    ``expand``'s fp16 roundings move a scale by at most 255 / 2**11 of a code step and an offset by
    about 127 / 2**10, both well under half a step, so rounding back finds the codes.
    """
    return codes_on(scale, zero, sup, group_size)


def surely_recoverable(scale: torch.Tensor, zero: torch.Tensor) -> bool:
    """A cheap sufficient condition for ``recover_codes`` to be exact: every expanded scale is a
    normal fp16 (relative error at most 2**-11, so a code of at most 255 moves by under 1/8 step),
    and every zero point is 0 or a normal fp16 below the clamp (the offset then moves by under 1/16
    step). Where it fails, ``exact_recovery`` decides."""
    normal = 2.0**-14
    z = zero.abs()
    return bool(scale.min() >= normal) and bool(((z == 0) | ((z >= normal) & (z < 65504.0))).all())


def exact_recovery(
    scale_codes: torch.Tensor, offset_codes: torch.Tensor, sup: torch.Tensor, group_size: int
) -> bool:
    """Whether ``recover_codes(expand(codes))`` gives these codes back (so they need not be kept)."""
    scale, zero = expand(scale_codes, offset_codes, sup, group_size)
    got_s, got_o = recover_codes(scale, zero, sup, group_size)
    return bool(torch.equal(got_s, scale_codes) and torch.equal(got_o, offset_codes))


def snap_params(
    scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group parameters moved onto the super-block grid: quantize them, then expand.

    Args:
        scale: ``[r, G]``.
        zero: ``[r, G]``.
        group_size: the scheme's group size.

    Returns:
        ``(scale fp16 [r, G], zero fp16 [r, G], sup fp16 [r, S, 2])``: what the stored codes mean.
    """
    scale_codes, offset_codes, sup = quantize_params(scale, zero, group_size)
    scale16, zero16 = expand(scale_codes, offset_codes, sup, group_size)
    return scale16, zero16, sup


def fit_on_grid(
    wg: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmax: int,
    group_size: int,
    weight: torch.Tensor | None = None,
    rounds: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chunk's parameters on the super-block grid, refit to the codes they give.

    The pairs ``(d, dm)`` come from the given parameters; then, ``rounds`` times, each group's codes
    are assigned, its scale and offset refit by (weighted) least squares and moved back onto the
    grid, and the refit kept where it lowers the group's (weighted) squared error.

    Args:
        wg: float32 groups ``[r, G, g]``.
        scale: ``[r, G, 1]`` the method's scales.
        zero: ``[r, G, 1]`` the method's zeros.
        qmax: the largest code.
        group_size: ``g``.
        weight: optional importance weights ``[1, G, g]``.
        rounds: refits tried.

    Returns:
        ``(scale, zero)`` ``[r, G, 1]`` float32 holding the fp16 values the stored codes expand to,
        and ``sup`` ``[r, S, 2]`` fp16.
    """
    r, n_groups = wg.shape[0], wg.shape[1]
    flat = (scale.view(r, n_groups), zero.view(r, n_groups))
    scale_codes, offset_codes, sup = quantize_params(*flat, group_size)
    s16, z16 = expand(scale_codes, offset_codes, sup, group_size)
    best_s, best_z = s16.float().unsqueeze(-1), z16.float().unsqueeze(-1)
    weight = torch.ones_like(wg[:1]) if weight is None else weight
    best_err = weighted_sq_error(wg, assign_codes(wg, best_s, best_z, qmax), best_s, best_z, weight)
    for _ in range(rounds):
        q = assign_codes(wg, best_s, best_z, qmax)
        slope, zero_fit, _ok = weighted_fit(wg, q, weight, best_s, best_z)
        cs, co = codes_on(slope.view(r, n_groups), zero_fit.view(r, n_groups), sup, group_size)
        s16, z16 = expand(cs, co, sup, group_size)
        cand_s, cand_z = s16.float().unsqueeze(-1), z16.float().unsqueeze(-1)
        err = weighted_sq_error(wg, assign_codes(wg, cand_s, cand_z, qmax), cand_s, cand_z, weight)
        better = err < best_err
        best_s, best_z = torch.where(better, cand_s, best_s), torch.where(better, cand_z, best_z)
        best_err = torch.minimum(err, best_err)
    return best_s, best_z, sup
