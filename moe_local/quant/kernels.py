"""torch's CPU int4 matmul (``_weight_int4pack_mm_for_cpu``) behind a small, checked interface.

The kernel computes ``x @ W_hat.T`` with ``W_hat = (q - 8) * s + b`` per group, straight from 4-bit
codes in a machine-specific packed layout (it depends on the CPU's vector width), with fp32
accumulation. Our convention ``W_hat = (q - zero) * scale`` maps onto it with ``s = scale``,
codes ``q + c`` and ``b = (8 - c - zero) * scale``, where ``c = 8 - 2**(bits - 1)`` centers 2- and
3-bit codes on 8 (0 for 4-bit): ``b`` then stays small, so rounding it to bf16 costs little.

The layout is a permutation of nibbles, so it converts both ways exactly: ``pack_int4_weight`` and
``unpack_int4_weight`` do it with a few vectorized byte ops (torch's own conversion needs the codes
widened to int32 and cannot go back). ``QuantizedTensor`` keeps the kernel layout as the one copy of
its codes and rebuilds our packing from it only to save or move the weight.

Only bf16 activations take the kernel: its fp16/fp32 variants are scalar loops on x86 and slower
than dequantize-then-matmul.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moe_local.quant.pack import pack_codes, packed_size, unpack_codes

# Shapes: [O, I] weight, [M, I] activations, [G, O, 2] kernel scale/bias.
# Legend: O=out features, I=in features, M=tokens, G=groups per row (I / group size).

KERNEL_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)
_ROW_BLOCK = 64  # torch's conversion runs in multiples of its largest row block
_CONVERT_ELEMS = 1 << 22  # codes widened to int32 at once by torch's conversion
# 4-bit codes shuffled at once: the temporaries then stay in malloc's reused heap, under glibc's mmap
# threshold (1 MiB once CachedStore sets it); fresh pages cost more than the shuffle (~4 ms/MB of
# first-touch faults on the 2-core VM, against ~1 ms/MB for the whole conversion)
_TEMP_BYTES = 1 << 19


@dataclass(frozen=True)
class Layout:
    """The kernel's packed layout on this machine, as far as ``pack_int4_weight`` reproduces it.

    Rows go in blocks of ``block``; per block and input feature ``k``, byte ``j`` holds row ``j``
    (low nibble) and row ``j + block / 2`` (high nibble). The last ``O % block`` rows form a shorter
    block whose byte ``j`` holds rows ``2j`` and ``2j + 1``.

    Attributes:
        block: the row block (32 with AVX2, 64 with AVX-512); 0 when this torch lays codes out in a
            way we do not reproduce (then torch converts, and the conversion is one-way).
    """

    block: int


def int4_kernel_available() -> bool:
    """Check for the CPU int4 ops (present in torch >= 2.5 builds).

    Returns:
        True when this torch build has the CPU int4 pack and matmul ops.
    """
    ops = ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")
    return all(hasattr(torch.ops.aten, op) for op in ops)


def int4_kernel_supports(shape: tuple[int, int], bits: int, group_size: int, device: torch.device) -> bool:
    """Return True when a weight of this shape and scheme can run on the CPU int4 kernel.

    Args:
        shape: ``(O, I)``.
        bits: code width (the kernel takes codes below 16, so 2, 3 and 4 bits).
        group_size: weights per group along ``I``.
        device: where the weight lives.

    Returns:
        Whether ``pack_int4_weight`` and ``int4_linear`` accept this weight.
    """
    o, i = shape
    return (
        device.type == "cpu"
        and bits <= 4
        and group_size in KERNEL_GROUP_SIZES
        and o % 16 == 0
        and i % group_size == 0
        and int4_kernel_available()
    )


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU ops on this thread alone for a while.

    Byte shuffles of a few MB finish before a second OpenMP thread has woken, and on a machine whose
    other cores are busy (a prefetch thread, another process) the team's barrier spins instead: on
    the 2-core VM a conversion took 1-90 ms with 2 threads against a steady 0.65 ms with one. The
    setting is per thread (OpenMP's and MKL's), except that a thread running its first torch op
    meanwhile starts with one thread too.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _torch_convert(packed: torch.Tensor, bits: int, i: int) -> torch.Tensor:
    """torch's own conversion, in row chunks (it needs the codes widened to int32)."""
    step = max(_ROW_BLOCK, _CONVERT_ELEMS // i // _ROW_BLOCK * _ROW_BLOCK)
    offset = 8 - (1 << (bits - 1))
    parts = []
    for start in range(0, packed.shape[0], step):
        codes = unpack_codes(packed[start : start + step], bits, i).to(torch.int32)
        parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.add_(offset), 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _spread(x: torch.Tensor, steps: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
    """Move bit fields apart: per step ``x = (x & keep) | ((x & move) << shift)``."""
    for keep, move, shift in steps:
        x = (x & keep).bitwise_or_((x & move) << shift)
    return x


def _gather(x: torch.Tensor, steps: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
    """Inverse of ``_spread`` (the steps in reverse)."""
    for keep, move, shift in reversed(steps):
        x = (x & keep).bitwise_or_((x >> shift) & move)
    return x


# 2-bit: one byte of 4 codes -> 16 bits of 4 nibbles; 3-bit: 3 bytes of 8 codes -> 32 bits of 8 nibbles.
_SPREAD2 = ((0x0F, 0xF0, 4), (0x0303, 0x0C0C, 2))
_SPREAD3 = ((0xFFF, 0xFFF000, 4), (0x003F003F, 0x0FC00FC0, 2), (0x07070707, 0x38383838, 1))
_CENTER = {2: 0x6666, 3: 0x44444444}  # 8 - 2**(bits - 1) added to every nibble (no carries: codes < 8)


def _as_nibbles(packed: torch.Tensor, bits: int, i: int) -> torch.Tensor:
    """Our codes as 4-bit packing (``c[2p] | c[2p+1] << 4``) of the kernel's codes ``q + 8 - 2**(bits-1)``.

    Bit-field moves on 16- or 32-bit words (little-endian, like every platform torch runs on).
    """
    r = packed.shape[0]
    if bits == 4:
        return packed
    if bits == 2:
        words = _spread(packed.to(torch.int16), _SPREAD2)
    else:
        padded = torch.zeros(r, i // 8, 4, dtype=torch.uint8)
        padded[:, :, :3] = packed.view(r, i // 8, 3)
        words = _spread(padded.view(torch.int32).view(r, i // 8), _SPREAD3)
    return words.add_(_CENTER[bits]).view(torch.uint8).view(r, i // 2)


def _from_nibbles(nibbles: torch.Tensor, bits: int, i: int) -> torch.Tensor:
    """Inverse of ``_as_nibbles``."""
    r = nibbles.shape[0]
    if bits == 4:
        return nibbles
    if bits == 2:
        words = _gather(nibbles.view(torch.int16).sub(_CENTER[2]), _SPREAD2)
        return words.to(torch.uint8)
    words = _gather(nibbles.view(torch.int32).sub(_CENTER[3]), _SPREAD3)
    return words.view(torch.uint8).view(r, i // 8, 4)[:, :, :3].reshape(r, i // 8 * 3)


def _merge(lo: torch.Tensor, hi: torch.Tensor, out: torch.Tensor) -> None:
    """Kernel bytes of row blocks: 4-bit rows ``lo``/``hi`` ``[B, half, I/2]`` -> ``out [B, I/2, 2, half]``.

    ``out[b, p, e, j]`` holds feature ``k = 2p + e`` of ``lo`` row ``j`` (low nibble) and of ``hi``
    row ``j`` (high nibble): nibble ops on contiguous bytes, then one transposing copy per parity.
    """
    out[:, :, 0].copy_(((lo & 15) | (hi << 4)).transpose(1, 2))
    out[:, :, 1].copy_(((lo >> 4) | (hi & 0xF0)).transpose(1, 2))


def _split(kernel: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Inverse of ``_merge``: ``kernel`` ``[B, I/2, 2, half]`` -> ``lo``/``hi`` ``[B, half, I/2]``."""
    even, odd = kernel[:, :, 0], kernel[:, :, 1]  # [B, I/2, half]
    lo.copy_(((even & 15) | (odd << 4)).transpose(1, 2))
    hi.copy_(((even >> 4) | (odd & 0xF0)).transpose(1, 2))


def _blocks(rows: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``lo``/``hi`` views ``[B, half, I/2]`` of 4-bit rows ``[R, I/2]``, grouped as ``Layout`` says."""
    r, width = rows.shape
    if r % block == 0:  # whole blocks: rows j and j + block / 2
        v = rows.view(r // block, 2, block // 2, width)
        return v[:, 0], v[:, 1]
    v = rows.view(1, r // 2, 2, width)  # the short last block: rows 2j and 2j + 1
    return v[:, :, 0], v[:, :, 1]


def _chunks(
    o: int, width: int, block: int, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, int]]:
    """Row ranges of at most ``_TEMP_BYTES`` of 4-bit codes, each whole blocks or the short last block.

    ``start`` must be a block boundary (or the short block's start) and ``end`` one too, or ``O``.
    """
    end = o if end is None else end
    full = o // block * block
    step = max(block, _TEMP_BYTES // max(width, 1) // block * block)
    for s in range(start, min(end, full), step):
        yield s, min(end, full, s + step)
    if end > full:
        yield max(start, full), o


def _convert(packed: torch.Tensor, bits: int, i: int, block: int) -> torch.Tensor:
    """Kernel layout ``[O, I/2]`` of our packed codes, a chunk of rows at a time."""
    o, width = packed.shape[0], i // 2
    out = torch.empty(o, width, dtype=torch.uint8)
    for start, end in _chunks(o, width, block):
        lo, hi = _blocks(_as_nibbles(packed[start:end], bits, i), block)
        _merge(lo, hi, out[start:end].view(lo.shape[0], width, 2, lo.shape[1]))
    return out


def _nibble_chunks(
    kernel: torch.Tensor, block: int, start: int, end: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, 4-bit rows)`` read back from the kernel layout over block-aligned ``[start, end)``."""
    o, width = kernel.shape
    for s, e in _chunks(o, width, block, start, end):
        nibbles = torch.empty(e - s, width, dtype=torch.uint8)
        lo, hi = _blocks(nibbles, block)
        _split(kernel[s:e].view(lo.shape[0], width, 2, lo.shape[1]), lo, hi)
        yield s, nibbles


@functools.cache
def kernel_layout() -> Layout:
    """The kernel layout of this process, checked once against torch's own conversion.

    Random codes with every short last block this torch may use (16, 32 and 48 rows) must convert
    to the same bytes both ways; otherwise ``Layout(0)``: torch converts, and only one way.

    Returns:
        The layout.
    """
    if not int4_kernel_available():
        return Layout(0)
    gen = torch.Generator().manual_seed(0)
    for block in (32, 64):
        samples = [
            pack_codes(torch.randint(0, 16, (o, 64), generator=gen, dtype=torch.uint8), 4)
            for o in (block, 2 * block + 16, block + 32, block + 48)
        ]
        if all(_matches(packed, block) for packed in samples):
            return Layout(block)
    return Layout(0)


def _matches(packed: torch.Tensor, block: int) -> bool:
    converted = _convert(packed, 4, 64, block)
    back = torch.cat([n for _, n in _nibble_chunks(converted, block, 0, packed.shape[0])])
    return torch.equal(converted, _torch_convert(packed, 4, 64)) and torch.equal(back, packed)


def layout_reversible() -> bool:
    """Whether ``unpack_int4_weight`` can rebuild our codes from the kernel layout on this machine."""
    return kernel_layout().block > 0


def pack_int4_weight(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Convert our packed codes to the kernel's packed layout.

    The result equals torch's ``_convert_weight_to_int4pack_for_cpu`` of the codes shifted by
    ``8 - 2**(bits - 1)``, made with a few vectorized byte ops on one thread (several times faster
    than torch's conversion, which needs int32 codes) where ``kernel_layout`` knows the layout.

    Args:
        packed: our packed codes ``[O, I * bits / 8]`` uint8 on CPU.
        bits: code width (2, 3 or 4).
        shape: ``(O, I)``.

    Returns:
        The kernel's packed weight (``uint8 [O, I / 2]`` in a machine-specific layout).
    """
    i = shape[1]
    block = kernel_layout().block
    if not block:
        return _torch_convert(packed, bits, i)
    with one_thread():
        return _convert(packed, bits, i, block)


def unpack_int4_weight(weight: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Rebuild our packed codes from the kernel layout: the exact inverse of ``pack_int4_weight``.

    Args:
        weight: from ``pack_int4_weight`` (``uint8 [O, I / 2]``).
        bits: code width (2, 3 or 4).
        shape: ``(O, I)``.

    Returns:
        Our packed codes ``[O, I * bits / 8]`` uint8.

    Raises:
        RuntimeError: when ``layout_reversible()`` is False (callers keep their codes then).
    """
    o, i = shape
    block = kernel_layout().block
    if not block:
        raise RuntimeError("this torch's int4 layout is not one moe-local can convert back")
    out = torch.empty(o, packed_size(i, bits), dtype=torch.uint8)
    with one_thread():
        for start, nibbles in _nibble_chunks(weight, block, 0, o):
            out[start : start + nibbles.shape[0]] = _from_nibbles(nibbles, bits, i)
    return out


def int4_scale_bias(scales: torch.Tensor, zeros: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Build the kernel's per-group ``(s, b)`` pairs from our fp16 scales and zeros.

    Args:
        scales: ``[O, G]`` fp16.
        zeros: ``[O, G]`` fp16.
        bits: code width (2, 3 or 4), matching ``pack_int4_weight``'s code offset.
        dtype: the activation dtype the kernel runs in.

    Returns:
        ``[G, O, 2]`` contiguous, ``[..., 0] = scale`` and ``[..., 1] = (2**(bits - 1) - zero) * scale``.
    """
    o, g = scales.shape
    out = torch.empty(g, o, 2, dtype=dtype)
    step = max(1, _TEMP_BYTES // 4 // g)  # rows whose fp32 temporaries fit the reused heap
    for start in range(0, o, step):
        rows = slice(start, start + step)
        out[:, rows, 0].copy_(scales[rows].t())  # fp16 -> dtype rounds once, as through fp32
        s = scales[rows].t().to(torch.float32)
        out[:, rows, 1].copy_(zeros[rows].t().to(torch.float32).neg_().add_(float(1 << (bits - 1))).mul_(s))
    return out


def int4_linear(
    x2: torch.Tensor, weight: torch.Tensor, group_size: int, scale_bias: torch.Tensor
) -> torch.Tensor:
    """``x2 @ W_hat.T`` on the CPU int4 kernel.

    Args:
        x2: activations ``[M, I]`` in a dtype of ``KERNEL_DTYPES``.
        weight: from ``pack_int4_weight``.
        group_size: weights per group.
        scale_bias: from ``int4_scale_bias`` in ``x2.dtype``.

    Returns:
        ``[M, O]`` in ``x2.dtype``.
    """
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), weight, group_size, scale_bias)


def unpack_int4_rows(
    weight: torch.Tensor, bits: int, shape: tuple[int, int], start: int, end: int
) -> torch.Tensor:
    """Codes of rows ``[start, end)`` read back from the kernel layout (one code per byte).

    Only the row blocks that hold the range are converted back.

    Args:
        weight: from ``pack_int4_weight``, with ``layout_reversible()`` True.
        bits: code width (2, 3 or 4).
        shape: ``(O, I)``.
        start: first row.
        end: one past the last row.

    Returns:
        ``[end - start, I]`` uint8 codes, as ``unpack_codes`` of our packing gives them.
    """
    o, i = shape
    block = kernel_layout().block
    full = o // block * block
    first = start // block * block if start < full else full
    last = o if end > full else -(-end // block) * block
    out = torch.empty(end - start, i, dtype=torch.uint8)
    with one_thread():
        for s, nibbles in _nibble_chunks(weight, block, first, last):
            lo, hi = max(s, start), min(s + nibbles.shape[0], end)
            if lo >= hi:
                continue
            codes = unpack_codes(nibbles[lo - s : hi - s], 4, i)
            out[lo - start : hi - start] = codes.sub_(8 - (1 << (bits - 1))) if bits < 4 else codes
    return out
