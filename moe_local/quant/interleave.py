"""Quantized weights laid out as the CPU kernel reads them fastest: each row's codes, scales and zeros
side by side.

As stored (an expert's blob, the dense file), a weight's codes, scales and zeros are three arrays, so
a matrix-vector product walks three streams through memory at once. With each row's scales and
zeros beside its codes, the same product reads one stream: on the 2-core AVX-512 EPYC of
``benchmarks/RESULTS.md`` an int4-g64 ``[7168, 1024]`` matrix read from RAM went from 19 to 26 GB/s
on two threads, and within the noise on one (``benchmarks/bench_interleave.py``; a harness of the
kernel alone gave 14.3 -> 18.7 GB/s on one core). The values are the same bytes, so every
result is bit-identical; the tensors become row-strided views of one buffer, which the native kernel
reads through its row strides (``native.row_strides``) and torch reads like any strided tensor.

Row layout (bytes): ``[scales: 2G][zeros: 2G][padding to 32][codes: I * bits / 8][padding to 32]``, in
the order the kernel reads a row (the zero term first, then the codes), so the walk through memory
only goes forward; codes placed first measured slower than the three arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe_local.quant import native
from moe_local.quant.tensor import QuantizedTensor

ROW_ALIGN = 32  # a row starts on a 32-byte boundary: the kernel's code loads stay inside one line pair


def interleavable(w: object) -> bool:
    """Whether ``w`` is a weight the native kernel computes from plain codes, scales and zeros on the CPU."""
    if type(w) is not QuantizedTensor or w.qtype.superblock or w._packed is None:
        return False
    packed = w._packed
    if packed.device.type != "cpu" or packed.is_pinned():
        return False  # pinned codes are what device copies read: they stay as they are
    return native.supports(w.shape, w.qtype.bits, w.qtype.group_size, packed.device)


def _round(n: int) -> int:
    return -(-n // ROW_ALIGN) * ROW_ALIGN


def _row_bytes(w: QuantizedTensor) -> tuple[int, int, int]:
    """(scale bytes, where the codes start, padded row bytes) of one row of ``w``."""
    scale_bytes = 2 * w.scales.shape[1]
    codes_at = _round(2 * scale_bytes)
    return scale_bytes, codes_at, _round(codes_at + w._packed.shape[1])


def interleave(weights: Sequence[QuantizedTensor]) -> list[QuantizedTensor]:
    """``weights`` with their rows interleaved, all in one new buffer, back to back.

    One buffer for all of them keeps an expert one contiguous block; the old tensors are no longer
    referenced by the results (the caller drops them, and with them the blob they were views of).

    Args:
        weights: weights for which ``interleavable`` holds.

    Returns:
        New weights of the same values, schemes and shapes.

    Raises:
        ValueError: a weight that cannot be interleaved.
    """
    for w in weights:
        if not interleavable(w):
            raise ValueError(f"{w!r} is not a plain CPU weight of the native kernel")
    sizes = [_row_bytes(w) for w in weights]
    total = sum(w.shape[0] * row for w, (_, _, row) in zip(weights, sizes, strict=True))
    buffer = torch.empty(total, dtype=torch.uint8)
    out, start = [], 0
    for w, (scale_bytes, codes_at, row) in zip(weights, sizes, strict=True):
        rows = buffer[start : start + w.shape[0] * row].view(w.shape[0], row)  # [O, row bytes]
        start += w.shape[0] * row
        scales = rows[:, :scale_bytes].view(torch.float16)  # [O, G]
        zeros = rows[:, scale_bytes : 2 * scale_bytes].view(torch.float16)
        packed = rows[:, codes_at : codes_at + w._packed.shape[1]]  # [O, P]
        # the padding is zeroed (no uninitialised bytes in a buffer that may be copied whole); the
        # rest is written below, so the expert read on a miss is not cleared first
        rows[:, 2 * scale_bytes : codes_at].zero_()
        rows[:, codes_at + w._packed.shape[1] :].zero_()
        packed.copy_(w._packed)
        scales.copy_(w.scales)
        zeros.copy_(w.zeros)
        out.append(QuantizedTensor(packed, scales, zeros, w.shape, w.qtype))
    return out
