"""Group-wise 8-bit weights on torch's CPU int8 matmul (``_weight_int8pack_mm``), one call per group.

torch's kernel computes ``x @ (w * s[:, None]).T`` for int8 ``w [O, K]`` and one scale per output
row, so a group-wise weight ``W_hat = (q - zero) * scale`` runs as a sum over its groups ``g``:

    y = sum_g kernel(x_g, q_g - 128, scale_g) - (sum_k x_g[k]) @ ((zero_g - 128) * scale_g).T

with the codes stored once, as int8 ``[G, O, group]`` (``q - 128``: the same bytes with the top bit
flipped, so the conversion is exact both ways), and the group sums accumulated in fp32. The scale
goes to the kernel in the activations' dtype (bf16), and the zero term uses that same rounded scale,
so the product is ``(q - zero) * bf16(scale)`` per group, as on the int4 kernel.

Measured on 2 AVX2 cores with bf16 activations, against dequantizing every call (what 8-bit
weights did before) and against a dense bf16 copy of ``W_hat`` (twice the bytes): 5-10x faster than
the former and 1.5-3x faster than the latter from 4096 x 4096 up, at 1 and 512 tokens; at 576 x 576
the per-group calls cost more than the bf16 matmul but still run 2.5x faster than dequantizing. See
``benchmarks/bench_kernels.py --int8``.
"""

from __future__ import annotations

import contextlib

import torch

from moe_local.quant.kernels import one_thread

# Shapes: [O, I] weight, [M, I] activations, [G, O, g] kernel codes, [G, O] per-group parameters.
# Legend: O=out features, I=in features, M=tokens, G=groups per row (I / g), g=group size.

INT8_KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)  # fp32/fp16 run as scalar loops
# Bytes of one call's partial product: kept small so prefill's [M, O] partials come from malloc's
# reused heap instead of fresh pages (glibc maps blocks over 1 MiB once CachedStore sets it).
_PARTIAL_BYTES = 1 << 19
# Multiply-adds of one call below which the calls run on one thread: G calls mean G OpenMP barriers,
# and on the 2-core VM with the other core busy each could wait a scheduler tick (decode of a
# 4096 x 14336 int8-g64 weight: 14-22 ms on one thread, 23-1800 ms on two).
_THREADED_MACS = 1 << 22


def int8_kernel_available() -> bool:
    """Check for torch's CPU int8 weight matmul.

    Returns:
        True when this torch build has ``aten._weight_int8pack_mm``.
    """
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int8_kernel_supports(device: torch.device) -> bool:
    """Return True when an 8-bit group-wise weight on ``device`` can run on the int8 kernel.

    Args:
        device: where the weight lives (any shape and group size runs).

    Returns:
        Whether ``pack_int8_weight`` and ``int8_linear`` accept it.
    """
    return device.type == "cpu" and int8_kernel_available()


def pack_int8_weight(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reorder 8-bit codes ``[O, I]`` (uint8) into the kernel's ``[G, O, g]`` int8 ``q - 128``.

    Args:
        packed: our 8-bit codes ``[O, I]`` uint8 (8-bit packing is one code per byte).
        group_size: ``g``.

    Returns:
        ``[G, O, g]`` int8, contiguous.
    """
    o, i = packed.shape
    out = torch.empty(i // group_size, o, group_size, dtype=torch.uint8)
    with one_thread():
        torch.bitwise_xor(packed.view(o, i // group_size, group_size).transpose(0, 1), 0x80, out=out)
    return out.view(torch.int8)


def unpack_int8_rows(weight: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Our 8-bit codes of rows ``[start, end)``: the exact inverse of ``pack_int8_weight``.

    Args:
        weight: from ``pack_int8_weight``.
        start: first row.
        end: one past the last row.

    Returns:
        ``[end - start, I]`` uint8.
    """
    groups, _, g = weight.shape
    out = torch.empty(end - start, groups, g, dtype=torch.uint8)
    with one_thread():
        torch.bitwise_xor(weight.view(torch.uint8)[:, start:end].transpose(0, 1), 0x80, out=out)
    return out.view(end - start, groups * g)


def int8_group_params(
    scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's per-group scales and the fp32 weights of the zero term.

    Args:
        scales: ``[O, G]`` fp16.
        zeros: ``[O, G]`` fp16.
        dtype: the activations' dtype.

    Returns:
        ``(scale [G, O] in dtype, zero_term [G, O] fp32)``, ``zero_term = (zero - 128) * scale`` with
        the scale as rounded to ``dtype``.
    """
    scale = scales.t().to(dtype).contiguous()
    zero_term = (zeros.t().to(torch.float32) - 128.0).mul_(scale.to(torch.float32)).contiguous()
    return scale, zero_term


def int8_linear(
    x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero_term: torch.Tensor
) -> torch.Tensor:
    """``x2 @ W_hat.T`` on the CPU int8 kernel, one call per group.

    Args:
        x2: activations ``[M, I]`` in a dtype of ``INT8_KERNEL_DTYPES``.
        weight: from ``pack_int8_weight``.
        scale: from ``int8_group_params`` in ``x2.dtype``.
        zero_term: from ``int8_group_params``.

    Returns:
        ``[M, O]`` in ``x2.dtype``.
    """
    groups, o, g = weight.shape
    m = x2.shape[0]
    xg = x2.reshape(m, groups, g).transpose(0, 1).contiguous()  # [G, M, g]: each group contiguous
    out = torch.mm(xg.sum(-1, dtype=torch.float32).t(), zero_term).neg_()  # [M, O] fp32
    mm = torch.ops.aten._weight_int8pack_mm.default
    step = max(64, _PARTIAL_BYTES // (2 * m))  # output rows per call: many tokens, fewer rows
    small = m * min(o, step) * g < _THREADED_MACS
    xs = xg.unbind(0)
    with one_thread() if small else contextlib.nullcontext():
        for start in range(0, o, step):
            rows = slice(start, start + step)
            acc = out[:, rows]
            for xk, wk, sk in zip(xs, weight[:, rows].unbind(0), scale[:, rows].unbind(0), strict=True):
                acc.add_(mm(xk, wk, sk))
    return out.to(x2.dtype)
