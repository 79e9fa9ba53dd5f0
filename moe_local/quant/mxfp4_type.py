"""``Mxfp4Type``: the OCP Microscaling FP4 scheme (MXFP4), as GPT-OSS checkpoints ship their experts.

A weight ``[O, I]`` is cut along ``I`` into blocks of 32 values; each block stores one shared
e8m0 exponent (a byte ``e``, the scale ``2 ** (e - 127)``) and 32 FP4 e2m1 elements (4 bits each,
two a byte, the low nibble first): 4 + 8 / 32 = 4.25 bits a weight. The scheme has one name,
``mxfp4``: its element type, block size and scale type are fixed by the spec.
"""

from __future__ import annotations

from dataclasses import dataclass

MXFP4_NAME = "mxfp4"
MXFP4_BLOCK = 32  # values sharing one exponent (OCP MX spec, and GPT-OSS's checkpoints)
E8M0_BIAS = 127
# e2m1 values by code: bit 3 the sign, bits 2-1 the exponent, bit 0 the mantissa
FP4_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                                 -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # fmt: skip
FP4_EMAX = 2  # the largest e2m1 value, 6 = 1.5 * 2 ** 2


@dataclass(frozen=True)
class Mxfp4Type:
    """The MXFP4 scheme (no parameters: the OCP MX spec fixes them).

    Attributes:
        bits: 4 bits per stored element.
        block_size: 32 elements per shared exponent.
    """

    bits: int = 4
    block_size: int = MXFP4_BLOCK

    def __post_init__(self) -> None:
        if self.bits != 4 or self.block_size != MXFP4_BLOCK:
            raise ValueError(
                f"mxfp4 is 4-bit in blocks of {MXFP4_BLOCK}, got {self.bits} / {self.block_size}"
            )

    @property
    def full_name(self) -> str:
        """``"mxfp4"``; ``parse_mxfp4_type`` reads it back."""
        return MXFP4_NAME

    @property
    def bits_per_weight(self) -> float:
        """4.25: four bits an element and one byte of exponent per 32."""
        return self.bits + 8 / self.block_size

    def fits(self, in_features: int) -> bool:
        """Whether a weight of ``in_features`` inputs splits into whole blocks."""
        return in_features % self.block_size == 0

    def stored_nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes a weight ``[O, I]`` takes: ``O * I / 2`` of elements and ``O * I / 32`` of exponents."""
        o, i = shape[-2], shape[-1]
        return o * i // 2 + o * (i // self.block_size)

    def __str__(self) -> str:
        return self.full_name


def parse_mxfp4_type(text: str) -> Mxfp4Type:
    """Parse the scheme name ``"mxfp4"`` (case and surrounding spaces ignored).

    Args:
        text: the name.

    Returns:
        The scheme.

    Raises:
        ValueError: for any other name.
    """
    if not isinstance(text, str) or text.strip().lower() != MXFP4_NAME:
        raise ValueError(f"not an mxfp4 scheme: {text!r}")
    return Mxfp4Type()
