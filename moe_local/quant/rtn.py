"""Group-wise asymmetric round-to-nearest (RTN) quantization, and the chunked driver HQQ shares.

Convention (used by every module of this package):

* a weight ``W [O, I]`` is split along ``I`` into groups of ``group_size`` consecutive weights;
* each group has an fp16 ``scale`` and an fp16 ``zero`` point (a float, not rounded to an integer);
* codes are ``q = clamp(round(W * (1 / scale) + zero), 0, 2**bits - 1)`` (stored as uint8, packed);
* the reconstruction is ``W_hat = (q - zero) * scale``.

RTN picks ``scale = (max - min) / (2**bits - 1)`` and ``zero = -min / scale`` so the group's min and
max land on codes 0 and ``2**bits - 1``. Constant groups get a power-of-two scale so they reconstruct
exactly (for fp16-representable values), and ``scale >= absmax / 2**14`` keeps ``|zero|`` inside fp16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from moe_local.quant import superblock
from moe_local.quant.lsfit import assign_codes
from moe_local.quant.pack import pack_codes, packed_size
from moe_local.quant.schemes import QType

# Shapes: [O, I] weight, [r, G, g] a chunk of rows viewed as groups, [r, G, 1] per-group params.
# Legend: O=out features, I=in features, r=rows in a chunk, G=groups per row (I / g), g=group size.

DEFAULT_CHUNK_ELEMS = 1 << 20  # weights processed at once: keeps the fp32 work buffers cache-friendly
MIN_SCALE = 2.0**-24  # smallest positive fp16 (subnormal); a scale never rounds to 0
ZERO_RANGE = 2.0**14  # scale >= absmax / ZERO_RANGE, so |zero| stays well inside fp16's 65504
FP16_MAX = 65504.0

# (wg [r, G, g] fp32, qmax) -> (scale, zero) [r, G, 1] fp32 holding fp16-representable values
ParamsFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


class QuantParts(NamedTuple):
    """The stored form of a quantized weight: packed codes and per-group fp16 scale and zero.

    For super-block schemes, ``scales`` and ``zeros`` are what the stored codes expand to and
    ``superscales`` holds the super-blocks' fp16 pairs (``moe_local.quant.superblock``).
    """

    packed: torch.Tensor  # [O, I * bits / 8] uint8
    scales: torch.Tensor  # [O, G] fp16
    zeros: torch.Tensor  # [O, G] fp16
    superscales: torch.Tensor | None = None  # [O, S, 2] fp16, super-block schemes only


def check_weight(w: torch.Tensor, group_size: int) -> tuple[int, int]:
    """Validate a weight matrix for group-wise quantization.

    Args:
        w: the weight, a 2-D floating-point tensor ``[O, I]``.
        group_size: weights per group along ``I``.

    Returns:
        ``(O, I)``.

    Raises:
        ValueError: when ``w`` is not a 2-D float tensor, is empty, or ``I % group_size != 0``.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"weight must be a floating-point tensor, got {got}")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    o, i = w.shape
    if o == 0 or i == 0:
        raise ValueError(f"weight must not be empty, got shape {(o, i)}")
    if i % group_size:
        raise ValueError(f"in features I={i} is not divisible by group size {group_size}")
    return o, i


def row_chunks(rows: int, cols: int, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Iterator[tuple[int, int]]:
    """Yield ``(start, end)`` row ranges holding at most ``chunk_elems`` elements (at least one row).

    Args:
        rows: number of rows.
        cols: elements per row.
        chunk_elems: element budget per chunk.

    Returns:
        An iterator of half-open row ranges covering ``[0, rows)``.
    """
    step = max(1, chunk_elems // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def to_fp16_values(t: torch.Tensor) -> torch.Tensor:
    """Round a float32 tensor to the nearest fp16 values, keeping float32 dtype.

    Args:
        t: float32 tensor.

    Returns:
        float32 tensor holding fp16-representable values.
    """
    return t.to(torch.float16).to(torch.float32)


def rtn_params(wg: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute min/max RTN scale and zero per group, in float32 and not yet rounded to fp16.

    Args:
        wg: float32 groups ``[r, G, g]``.
        qmax: the largest code, ``2**bits - 1``.

    Returns:
        ``(scale, zero, absmax)``, each ``[r, G, 1]`` float32.

    Raises:
        ValueError: when a weight is NaN/inf or a scale does not fit fp16.
    """
    mn = wg.amin(dim=-1, keepdim=True)
    mx = wg.amax(dim=-1, keepdim=True)
    if not (torch.isfinite(mn).all() and torch.isfinite(mx).all()):
        raise ValueError("weight contains NaN or inf values")
    absmax = torch.maximum(mn.abs(), mx.abs())
    scale = torch.maximum((mx - mn) / qmax, absmax / ZERO_RANGE).clamp_(min=MIN_SCALE)
    # A constant group: a power-of-two scale makes zero = -v / scale exact, so (0 - zero) * scale == v.
    pow2 = torch.exp2(torch.floor(torch.log2(absmax.clamp(min=MIN_SCALE)))).clamp_(MIN_SCALE, 2.0**15)
    scale = torch.where(mx == mn, pow2, scale)
    if bool((scale > FP16_MAX).any()):
        raise ValueError("weight values too large for fp16 scales (a group spans over 65504 * (2**bits - 1))")
    return scale, -mn / scale, absmax


def rtn_fp16_params(wg: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN scale and zero rounded to fp16 values; the zero is recomputed from the rounded scale.

    Args:
        wg: float32 groups ``[r, G, g]``.
        qmax: the largest code.

    Returns:
        ``(scale, zero)`` ``[r, G, 1]`` float32 holding fp16-representable values.
    """
    scale, zero, _ = rtn_params(wg, qmax)
    scale16 = to_fp16_values(scale)
    zero16 = to_fp16_values((zero * scale / scale16).clamp_(-FP16_MAX, FP16_MAX))
    return scale16, zero16


def group_sq_error(
    wg: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    buf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared L2 reconstruction error per group, ``sum((W - (q - zero) * scale)**2)``.

    Args:
        wg: float32 groups ``[r, G, g]``.
        q: float32 codes ``[r, G, g]``.
        scale: ``[r, G, 1]``.
        zero: ``[r, G, 1]``.
        buf: optional float32 scratch buffer shaped like ``wg``.

    Returns:
        ``[r, G, 1]`` float32 errors.
    """
    d = torch.sub(q, zero, out=buf) if buf is not None else q - zero
    d.mul_(scale).sub_(wg)
    return torch.linalg.vector_norm(d, dim=-1, keepdim=True).square_()


def quantize_groups(
    w: torch.Tensor,
    qtype: QType,
    params_fn: ParamsFn,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    weight: torch.Tensor | None = None,
) -> QuantParts:
    """Quantize ``w`` chunk by chunk: ``params_fn`` picks each group's params, codes are assigned and packed.

    For super-block schemes the params are then moved onto the super-block grid and refit there
    (``superblock.fit_on_grid``, under the importance ``weight`` when given).

    Args:
        w: float weight ``[O, I]`` (any float dtype, any device torch supports).
        qtype: the scheme (bits, group size and super-block choice are used here).
        params_fn: returns fp16-representable ``(scale, zero)`` for a float32 chunk ``[r, G, g]``.
        chunk_elems: weights processed at once.
        weight: optional importance weights ``[1, G, g]`` for the super-block refit.

    Returns:
        The packed codes, fp16 scales and fp16 zeros.

    Raises:
        ValueError: on a malformed weight (see ``check_weight``) or NaN/inf values.
    """
    o, i = check_weight(w, qtype.group_size)
    g = qtype.group_size
    n_groups = i // g
    packed = torch.empty(o, packed_size(i, qtype.bits), dtype=torch.uint8, device=w.device)
    scales = torch.empty(o, n_groups, dtype=torch.float16, device=w.device)
    zeros = torch.empty(o, n_groups, dtype=torch.float16, device=w.device)
    sup = None
    if qtype.superblock:
        sup = torch.empty(o, superblock.superblocks(n_groups, g), 2, dtype=torch.float16, device=w.device)
    for start, end in row_chunks(o, i, chunk_elems):
        wg = w[start:end].to(torch.float32).reshape(end - start, n_groups, g)
        scale, zero = params_fn(wg, qtype.qmax)
        if sup is not None:
            scale, zero, sup[start:end] = superblock.fit_on_grid(wg, scale, zero, qtype.qmax, g, weight)
        q = assign_codes(wg, scale, zero, qtype.qmax)
        packed[start:end] = pack_codes(q.to(torch.uint8).view(end - start, i), qtype.bits)
        scales[start:end] = scale.view(end - start, n_groups)
        zeros[start:end] = zero.view(end - start, n_groups)
    return QuantParts(packed, scales, zeros, sup)


def rtn_quantize(w: torch.Tensor, qtype: QType, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> QuantParts:
    """Quantize ``w`` with group-wise min/max round-to-nearest.

    (The importance-weighted variant is ``moe_local.quant.importance.weighted_rtn_quantize``.)

    Args:
        w: float weight ``[O, I]``; ``I`` must be divisible by ``qtype.group_size``.
        qtype: the scheme; its ``method`` is ignored.
        chunk_elems: weights processed at once (bounds the float32 working memory).

    Returns:
        The packed codes, fp16 scales ``[O, G]`` and fp16 zeros ``[O, G]``.

    Raises:
        ValueError: on a malformed weight or NaN/inf values.
    """
    return quantize_groups(w, qtype, rtn_fp16_params, chunk_elems)
