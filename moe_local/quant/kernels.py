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

import torch

from moe_local.quant.pack import unpack_codes

# Shapes: [O, I] weight, [M, I] activations, [G, O, 2] kernel scale/bias.
# Legend: O=out features, I=in features, M=tokens, G=groups per row (I / group size).

KERNEL_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)
_ROW_BLOCK = 64  # the kernel packs rows in blocks of 32 or 64; convert in multiples of 64
_CONVERT_ELEMS = 1 << 22  # codes widened to int32 at once while converting


def int4_kernel_available() -> bool:
    """Return True when this torch build has the CPU int4 pack and matmul ops."""
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


def pack_int4_weight(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Convert our packed codes to the kernel's packed layout, in row blocks to bound memory.

    Args:
        packed: our packed codes ``[O, I * bits / 8]`` uint8.
        bits: code width (2, 3 or 4); codes are shifted by ``8 - 2**(bits - 1)``.
        shape: ``(O, I)``.

    Returns:
        The kernel's packed weight (``uint8 [O, I / 2]`` in a machine-specific layout).
    """
    o, i = shape
    step = max(_ROW_BLOCK, _CONVERT_ELEMS // i // _ROW_BLOCK * _ROW_BLOCK)
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    offset = 8 - (1 << (bits - 1))
    parts = []
    for start in range(0, o, step):
        codes = unpack_codes(packed[start : start + step], bits, i).to(torch.int32)
        parts.append(convert(codes.add_(offset) if offset else codes, 1))
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
