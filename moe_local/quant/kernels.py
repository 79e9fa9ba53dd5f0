"""torch's CPU int4 matmul (``_weight_int4pack_mm_for_cpu``) behind a small, checked interface.

The kernel computes ``x @ W_hat.T`` with ``W_hat = (q - 8) * s + b`` per group, straight from 4-bit
codes in a machine-specific packed layout (it depends on the CPU's vector width), with fp32
accumulation. Our convention ``W_hat = (q - zero) * scale`` maps onto it with ``s = scale``,
codes ``q + c`` and ``b = (8 - c - zero) * scale``, where ``c = 8 - 2**(bits - 1)`` centers 2- and
3-bit codes on 8 (0 for 4-bit): ``b`` then stays small, so rounding it to bf16 costs little.

Only bf16 activations take the kernel: its fp16/fp32 variants are scalar loops on x86 and slower
than dequantize-then-matmul.
"""

from __future__ import annotations

import functools

import torch

from moe_local.quant.pack import pack_codes, unpack_codes

# Shapes: [O, I] weight, [M, I] activations, [G, O, 2] kernel scale/bias.
# Legend: O=out features, I=in features, M=tokens, G=groups per row (I / group size).

KERNEL_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)
_ROW_BLOCK = 64  # the kernel packs rows in blocks of 32 or 64; convert in multiples of 64
_CONVERT_ELEMS = 1 << 22  # codes widened to int32 at once while converting


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


def _torch_convert(packed: torch.Tensor, bits: int, i: int) -> torch.Tensor:
    """torch's own conversion, in row chunks (it needs the codes widened to int32)."""
    step = max(_ROW_BLOCK, _CONVERT_ELEMS // i // _ROW_BLOCK * _ROW_BLOCK)
    offset = 8 - (1 << (bits - 1))
    parts = []
    for start in range(0, packed.shape[0], step):
        codes = unpack_codes(packed[start : start + step], bits, i).to(torch.int32)
        parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.add_(offset), 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _split_convert(packed: torch.Tensor, bits: int, i: int, block: int) -> torch.Tensor:
    """Re-lay out whole row blocks into the "split" kernel layout with vectorized byte ops.

    Per block of ``block`` rows and per input feature ``k``, byte ``j`` holds row ``j`` (low nibble)
    and row ``j + block / 2`` (high nibble); ``packed`` must hold a whole number of blocks.
    """
    r, half = packed.shape[0], block // 2
    out = torch.empty(r // block, i // 2, 2, half, dtype=torch.uint8)  # [blocks, I/2, even/odd k, half]
    if bits == 4:  # straight from our bytes c[2j] | c[2j+1] << 4: no unpacking
        p = packed.view(r // block, 2, half, i // 2)
        lo, hi = p[:, 0], p[:, 1]  # [blocks, half, I/2]
        out[:, :, 0].copy_(((lo & 15) | (hi << 4)).transpose(1, 2))
        out[:, :, 1].copy_(((lo >> 4) | (hi & 0xF0)).transpose(1, 2))
    else:
        codes = unpack_codes(packed, bits, i).add_(8 - (1 << (bits - 1))).view(r // block, 2, half, i)
        pair = (codes[:, 0] | (codes[:, 1] << 4)).view(r // block, half, i // 2, 2)
        out.copy_(pair.permute(0, 2, 3, 1))
    return out.view(r, i // 2)


@functools.cache
def _split_block() -> int:
    """The row block of this process's kernel layout when it is the split layout, else 0.

    Found by comparing against torch's own conversion on random codes, so a torch build with
    another layout falls back to that (slower) conversion instead of computing garbage.
    """
    codes = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_codes(codes, 4)
    reference = _torch_convert(packed, 4, 64)
    for block in (64, 32):
        if torch.equal(_split_convert(packed, 4, 64, block), reference):
            return block
    return 0


def pack_int4_weight(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Convert our packed codes to the kernel's packed layout.

    The result equals torch's ``_convert_weight_to_int4pack_for_cpu`` of the codes shifted by
    ``8 - 2**(bits - 1)``. Whole row blocks are re-laid out with a few vectorized byte ops (about
    4x faster than torch's conversion, which needs int32 codes); a partial last block goes through
    torch's conversion.

    Args:
        packed: our packed codes ``[O, I * bits / 8]`` uint8 on CPU.
        bits: code width (2, 3 or 4).
        shape: ``(O, I)``.

    Returns:
        The kernel's packed weight (``uint8 [O, I / 2]`` in a machine-specific layout).
    """
    o, i = shape
    block = _split_block()
    full = o // block * block if block else 0
    parts = []
    if full:
        parts.append(_split_convert(packed[:full], bits, i, block))
    if full < o:
        parts.append(_torch_convert(packed[full:], bits, i))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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
    s = scales.to(torch.float32)
    b = (float(1 << (bits - 1)) - zeros.to(torch.float32)) * s
    return torch.stack((s, b), dim=-1).transpose(0, 1).contiguous().to(dtype)


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
