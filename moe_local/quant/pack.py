"""Bit packing of unsigned integer codes along the last dimension into ``uint8``.

Layouts (little-endian within each byte group, code ``k`` in the lowest free bits first):

* 8 bits: one code per byte, unchanged.
* 4 bits: two codes per byte, ``byte = c0 | c1 << 4``.
* 2 bits: four codes per byte, ``byte = c0 | c1 << 2 | c2 << 4 | c3 << 6``.
* 3 bits: eight codes in three bytes: the 24-bit little-endian word ``sum(c_k << 3k)``.
* ternary (codes 0, 1, 2; ``pack_ternary``): five codes in one byte, ``sum(c_k * 3**k)`` (at most
  242), each row padded with zero codes to a multiple of five.

Shapes: ``codes [..., N] -> packed [..., N * bits / 8]`` (ternary: ``[..., ceil(N / 5)]``).
"""

from __future__ import annotations

import torch

PACK_BITS: tuple[int, ...] = (8, 4, 3, 2)
# codes per packing unit, bytes per packing unit
_UNIT: dict[int, tuple[int, int]] = {8: (1, 1), 4: (2, 1), 3: (8, 3), 2: (4, 1)}


def _dtype_name(t: object) -> str:
    return str(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_bits(bits: int) -> None:
    if bits not in _UNIT:
        raise ValueError(f"cannot pack {bits}-bit codes; valid bits: {', '.join(map(str, PACK_BITS))}")


def packed_size(n: int, bits: int) -> int:
    """Return how many bytes ``n`` codes of ``bits`` bits pack into.

    Args:
        n: number of codes along the last dimension.
        bits: code width, one of 8, 4, 3, 2.

    Returns:
        ``n * bits // 8``.

    Raises:
        ValueError: when ``bits`` is unsupported or ``n`` is not a multiple of the packing unit.
    """
    _check_bits(bits)
    codes_per_unit, bytes_per_unit = _UNIT[bits]
    if n < 0 or n % codes_per_unit:
        msg = f"{bits}-bit packing needs the last dim to be a multiple of {codes_per_unit}, got {n}"
        raise ValueError(msg)
    return n // codes_per_unit * bytes_per_unit


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes along the last dimension into bytes.

    Args:
        codes: ``uint8`` tensor ``[..., N]`` with values in ``[0, 2**bits)``.
        bits: code width, one of 8, 4, 3, 2.

    Returns:
        A contiguous ``uint8`` tensor ``[..., N * bits / 8]``.

    Raises:
        ValueError: on a non-uint8 or 0-dim tensor, an unsupported ``bits``, an ``N`` that is not a
            multiple of the packing unit (8 for 3-bit) or a code that does not fit in ``bits``.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be a uint8 tensor, got {_dtype_name(codes)}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension")
    n = codes.shape[-1]
    packed_size(n, bits)
    if codes.numel() and bits < 8 and int(codes.max()) >> bits:
        raise ValueError(f"codes must be < {1 << bits} for {bits}-bit packing, got {int(codes.max())}")
    c = codes.contiguous()
    lead = c.shape[:-1]
    if bits == 8:
        return c.clone()
    if bits == 4:
        u = c.view(*lead, n // 2, 2)
        return (u[..., 0] | (u[..., 1] << 4)).contiguous()
    if bits == 2:
        u = c.view(*lead, n // 4, 4)
        return (u[..., 0] | (u[..., 1] << 2) | (u[..., 2] << 4) | (u[..., 3] << 6)).contiguous()
    u = c.view(*lead, n // 8, 8)
    b0 = u[..., 0] | (u[..., 1] << 3) | ((u[..., 2] & 3) << 6)
    b1 = (u[..., 2] >> 2) | (u[..., 3] << 1) | (u[..., 4] << 4) | ((u[..., 5] & 1) << 7)
    b2 = (u[..., 5] >> 1) | (u[..., 6] << 2) | (u[..., 7] << 5)
    return torch.stack((b0, b1, b2), dim=-1).view(*lead, n // 8 * 3)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack bytes written by ``pack_codes`` back into one code per byte.

    Args:
        packed: ``uint8`` tensor ``[..., n * bits / 8]``.
        bits: code width, one of 8, 4, 3, 2.
        n: number of codes along the last dimension.

    Returns:
        A contiguous ``uint8`` tensor ``[..., n]``.

    Raises:
        ValueError: on a non-uint8 tensor, an unsupported ``bits``, or a last dim that does not
            match ``n`` codes of ``bits`` bits.
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor, got {_dtype_name(packed)}")
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dimension")
    size = packed_size(n, bits)
    if packed.shape[-1] != size:
        raise ValueError(f"{n} codes of {bits} bits need a last dim of {size} bytes, got {packed.shape[-1]}")
    p = packed.contiguous()
    lead = p.shape[:-1]
    if bits == 8:
        return p.clone()
    if bits == 4:
        return torch.stack((p & 15, p >> 4), dim=-1).view(*lead, n)
    if bits == 2:
        return torch.stack((p & 3, (p >> 2) & 3, (p >> 4) & 3, p >> 6), dim=-1).view(*lead, n)
    u = p.view(*lead, n // 8, 3)
    b0, b1, b2 = u[..., 0], u[..., 1], u[..., 2]
    parts = (
        b0 & 7,
        (b0 >> 3) & 7,
        (b0 >> 6) | ((b1 & 1) << 2),
        (b1 >> 1) & 7,
        (b1 >> 4) & 7,
        (b1 >> 7) | ((b2 & 3) << 1),
        (b2 >> 2) & 7,
        b2 >> 5,
    )
    return torch.stack(parts, dim=-1).view(*lead, n)


TERNARY_PER_BYTE = 5
_TERNARY_MAX_BYTE = 3**TERNARY_PER_BYTE - 1  # 242
# byte -> its five base-3 digits, lowest first (bytes above 242 are refused before the lookup)
_TERNARY_DIGITS = torch.stack([(torch.arange(256) // 3**k) % 3 for k in range(TERNARY_PER_BYTE)], dim=-1).to(
    torch.uint8
)  # [256, 5]


def ternary_packed_size(n: int) -> int:
    """Bytes a row of ``n`` ternary codes packs into: ``ceil(n / 5)``."""
    if n < 0:
        raise ValueError(f"a row holds a non-negative number of codes, got {n}")
    return -(-n // TERNARY_PER_BYTE)


def _check_ternary(packed: object, n: int) -> int:
    """The bytes per row of ``n`` ternary codes, once ``packed`` is a uint8 tensor with that last dim."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor, got {_dtype_name(packed)}")
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dimension")
    m = ternary_packed_size(n)
    if packed.shape[-1] != m:
        raise ValueError(f"{n} ternary codes need a last dim of {m} bytes, got {packed.shape[-1]}")
    return m


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes 0, 1, 2 along the last dimension, five to a byte.

    Args:
        codes: ``uint8`` tensor ``[..., N]`` with values in ``{0, 1, 2}``.

    Returns:
        A contiguous ``uint8`` tensor ``[..., ceil(N / 5)]``; a row's last byte is padded with zero codes.

    Raises:
        ValueError: on a non-uint8 or 0-dim tensor or a code above 2.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be a uint8 tensor, got {_dtype_name(codes)}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension")
    if codes.numel() and int(codes.max()) > 2:
        raise ValueError(f"ternary codes are 0, 1 or 2, got {int(codes.max())}")
    n = codes.shape[-1]
    m = ternary_packed_size(n)
    pad = m * TERNARY_PER_BYTE - n
    padded = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
    u = padded.reshape(*codes.shape[:-1], m, TERNARY_PER_BYTE)
    out = u[..., 4] * 3  # Horner's rule in uint8: every partial sum is at most 242
    for k in (3, 2, 1):
        out += u[..., k]
        out *= 3
    return out.add_(u[..., 0]).contiguous()


def unpack_ternary(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Unpack bytes written by ``pack_ternary`` into one code (0, 1 or 2) per byte.

    Args:
        packed: ``uint8`` tensor ``[..., ceil(n / 5)]``.
        n: codes per row.

    Returns:
        A contiguous ``uint8`` tensor ``[..., n]``.

    Raises:
        ValueError: on a non-uint8 tensor, a last dim that does not hold ``n`` codes, or a byte
            above 242 (no five ternary codes make it: the data is not ternary-packed).
    """
    m = _check_ternary(packed, n)
    if packed.numel() and int(packed.max()) > _TERNARY_MAX_BYTE:
        raise ValueError(f"a ternary-packed byte is at most {_TERNARY_MAX_BYTE}, got {int(packed.max())}")
    digits = _TERNARY_DIGITS.to(packed.device)[packed.long()]  # [..., m, 5]
    return digits.reshape(*packed.shape[:-1], m * TERNARY_PER_BYTE)[..., :n].contiguous()


def ternary_to_2bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Repack ternary bytes into the 2-bit packing: ``pack_codes(unpack_ternary(packed, n), 2)``.

    This runs on every ternary expert read from disk, so it goes through moe-local's C kernel where
    that is built (about a byte a nanosecond) and through the two torch steps otherwise.

    Args:
        packed: ``uint8`` tensor ``[..., ceil(n / 5)]`` written by ``pack_ternary``.
        n: codes per row, a multiple of 4.

    Returns:
        A contiguous ``uint8`` tensor ``[..., n / 4]``.

    Raises:
        ValueError: as ``unpack_ternary``, or when ``n`` is not a multiple of 4.
    """
    from moe_local.quant import native  # here: the package imports this module before native

    if n % 4:
        raise ValueError(f"2-bit packing needs the last dim to be a multiple of 4, got {n}")
    _check_ternary(packed, n)  # bytes above 242: refused by the C loop or by unpack_ternary
    fast = native.ternary_to_2bit(packed, n) if packed.numel() else None
    return fast if fast is not None else pack_codes(unpack_ternary(packed, n), 2)
