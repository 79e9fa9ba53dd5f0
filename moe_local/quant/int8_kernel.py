"""Group-wise 8-bit weights on torch's CPU int8 matmul (``_weight_int8pack_mm``), one call per group.

torch's kernel computes ``x @ (w * s[:, None]).T`` for int8 ``w [O, K]`` and one scale per output
row, so a group-wise weight ``W_hat = (q - zero) * scale`` runs as a sum over its groups ``g``:

    y = sum_g kernel(x_g, q_g - 128, scale_g) - (sum_k x_g[k]) @ ((zero_g - 128) * scale_g).T

with the codes stored once, as int8 ``[G, O, group]`` (``q - 128``: the same bytes with the top bit
flipped, so the conversion is exact both ways), and the group sums accumulated in fp32. The scale
goes to the kernel in the activations' dtype (bf16), and the zero term uses that same rounded scale,
so the product is ``(q - zero) * bf16(scale)`` per group, as on the int4 kernel.

Small weights (``SPLIT_MAX_WEIGHTS``) run instead as their codes' two nibbles on the int4 kernel
(two calls; see the end of this module), where G calls' fixed cost would dominate.

Measured on 2 AVX2 cores, one torch thread, bf16 activations, against dequantizing every call (what
8-bit weights did before; ``benchmarks/bench_kernels.py --mode int8``): at 1 token 576 x 576 3.3x
(nibbles), 4096 x 4096 4.4x, 14336 x 4096 5.8x (per group); at 512 tokens 1.8-2.2x. A dense bf16
copy of ``W_hat`` (twice the bytes, and not convertible back to the codes exactly) decodes 576 x 576
1.7x faster than the nibbles, 4096 x 4096 as fast and 14336 x 4096 1.3x slower than the per-group
kernel, and is 2x slower at 512 tokens (bf16 matmuls are slow without AVX-512 BF16).
"""

from __future__ import annotations

import contextlib

import torch

from moe_local.quant import kernels
from moe_local.quant.kernels import one_thread

# Shapes: [O, I] weight, [M, I] activations, [G, O, g] kernel codes, [G, O] per-group parameters.
# Legend: O=out features, I=in features, M=tokens, G=groups per row (I / g), g=group size.

INT8_KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)  # fp32/fp16 run as scalar loops
# Bytes of one call's partial product: kept small so prefill's [M, O] partials come from malloc's
# reused heap instead of fresh pages (glibc maps blocks over 1 MiB once CachedStore sets it).
_PARTIAL_BYTES = 1 << 19
# Multiply-adds of one call below which the calls run on one thread: G calls mean G OpenMP barriers,
# and with another core busy each can wait a scheduler tick. On the 2-core VM, 4096 x 14336
# int8-g64 at 1 token: 14-22 ms on one thread, 23-1800 ms on two; at 16 tokens (4M per call) 347 ms
# on one, 8.4 s on two. Big prefill calls still take torch's threads, where many cores pay.
_THREADED_MACS = 1 << 24


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


# --- small 8-bit weights: the codes' two nibbles on the int4 kernel -------------------------------
#
# ``q = 16 * hi + lo`` with ``hi, lo`` in [0, 16), so ``W_hat = (q - zero) * scale`` is
# ``(hi - 8) * 16 scale + (lo - 8) * scale + (136 - zero) * scale``: two int4 kernel calls, one per
# nibble, whose layouts together hold the codes' 8 bits once. Two calls cost less than G per-group
# calls while the weight is small; beyond ``SPLIT_MAX_WEIGHTS`` the per-group int8 kernel is faster.

SPLIT_MAX_WEIGHTS = 1 << 21  # O * I; measured at 1 token: 192 x 576 0.05 ms against 0.27 ms per group,
# 3072 x 576 0.58 against 0.70, 2048 x 2048 1.26 against 1.08 (and at 31 tokens 8.8 against 7.1)


def split_supported(shape: tuple[int, int], group_size: int, device: torch.device) -> bool:
    """Whether an 8-bit weight of this shape runs as two nibbles on the int4 kernel (see above).

    Args:
        shape: ``(O, I)``.
        group_size: weights per group.
        device: where the weight lives.

    Returns:
        True for small enough weights whose nibbles the int4 kernel takes and converts back.
    """
    o, i = shape
    return (
        o * i <= SPLIT_MAX_WEIGHTS
        and kernels.int4_kernel_supports(shape, 4, group_size, device)
        and kernels.layout_reversible()
    )


def pack_split_weight(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The int4 kernel layouts of the high and low nibbles of 8-bit codes ``[O, I]``.

    Args:
        packed: our 8-bit codes ``[O, I]`` uint8.
        shape: ``(O, I)``.

    Returns:
        ``[2, O, I / 2]`` uint8: the high nibbles' layout, then the low nibbles'.
    """
    o, i = shape
    pairs = packed.contiguous().view(torch.int16)  # c[2p] | c[2p + 1] << 8 (little-endian)
    with one_thread():
        hi = ((pairs >> 4) & 0x0F).bitwise_or_((pairs >> 8) & 0xF0)  # 4-bit packing of c >> 4
        lo = (pairs & 0x0F).bitwise_or_((pairs >> 4) & 0xF0)  # and of c & 15
        out = torch.empty(2, o, i // 2, dtype=torch.uint8)
        for k, nibbles in enumerate((hi, lo)):
            out[k] = kernels.pack_int4_weight(nibbles.to(torch.uint8), 4, shape)
        return out


def unpack_split_rows(weight: torch.Tensor, shape: tuple[int, int], start: int, end: int) -> torch.Tensor:
    """Our 8-bit codes of rows ``[start, end)``: the exact inverse of ``pack_split_weight``.

    Args:
        weight: from ``pack_split_weight``.
        shape: ``(O, I)``.
        start: first row.
        end: one past the last row.

    Returns:
        ``[end - start, I]`` uint8.
    """
    hi, lo = (kernels.unpack_int4_rows(w, 4, shape, start, end) for w in weight)
    return hi.bitwise_left_shift_(4).bitwise_or_(lo)


def split_scale_bias(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int4 kernel's ``(s, b)`` pairs for the two nibbles.

    Args:
        scales: ``[O, G]`` fp16.
        zeros: ``[O, G]`` fp16.
        dtype: the activations' dtype.

    Returns:
        ``[2, G, O, 2]``: ``(16 scale, (136 - zero) scale)`` for the high nibbles, ``(scale, 0)``
        for the low ones.
    """
    s = scales.t().to(torch.float32)
    high = torch.stack((s * 16.0, (136.0 - zeros.t().to(torch.float32)) * s), dim=-1)
    low = torch.stack((s, torch.zeros_like(s)), dim=-1)
    return torch.stack((high, low)).to(dtype)


def split_linear(
    x2: torch.Tensor, weight: torch.Tensor, group_size: int, scale_bias: torch.Tensor
) -> torch.Tensor:
    """``x2 @ W_hat.T`` of a small 8-bit weight: one int4 kernel call per nibble.

    Args:
        x2: activations ``[M, I]`` in a dtype of ``kernels.KERNEL_DTYPES``.
        weight: from ``pack_split_weight``.
        group_size: weights per group.
        scale_bias: from ``split_scale_bias`` in ``x2.dtype``.

    Returns:
        ``[M, O]`` in ``x2.dtype``.
    """
    hi = kernels.int4_linear(x2, weight[0], group_size, scale_bias[0])
    return hi.add_(kernels.int4_linear(x2, weight[1], group_size, scale_bias[1]))
