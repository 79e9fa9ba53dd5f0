"""``BnbType``: the bitsandbytes weight types NF4 / FP4 (blockwise 4-bit) and LLM.int8 (row-wise 8-bit).

Type names: ``nf4``, ``fp4`` (block size 64), ``nf4-b128`` (other block sizes), ``nf4-dq`` /
``nf4-b128-dq`` (double quantization: the fp32 block absmax values are themselves 8-bit quantized in
blocks of 256), ``int8`` (per-output-row absmax scale, LLM.int8 without outlier decomposition).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BNB_KINDS: tuple[str, ...] = ("nf4", "fp4", "int8")
BNB_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # quantize_4bit's valid sizes
DEFAULT_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256  # double quantization block size (the only one matmul_4bit supports)

_BNB_TYPE_RE = re.compile(r"^([a-z0-9]+?)(?:-b(\d+))?(-dq)?$")


@dataclass(frozen=True)
class BnbType:
    """A bitsandbytes weight type.

    Attributes:
        kind: ``"nf4"`` or ``"fp4"`` (4-bit codes with one fp32 absmax per block of ``blocksize``
            consecutive weights of the flattened ``[O, I]`` matrix) or ``"int8"`` (int8 codes with
            one fp32 absmax per output row).
        blocksize: 4-bit block size, one of ``BNB_BLOCKSIZES``; must stay 64 for ``int8``.
        double_quant: 4-bit only: quantize the block absmax values to 8 bits (blocks of 256),
            saving about ``24 / blocksize`` bits per weight.
    """

    kind: str
    blocksize: int = DEFAULT_BLOCKSIZE
    double_quant: bool = False

    def __post_init__(self) -> None:
        if self.kind not in BNB_KINDS:
            raise ValueError(f"unknown bitsandbytes kind {self.kind!r}; valid: {', '.join(BNB_KINDS)}")
        if isinstance(self.blocksize, bool) or self.blocksize not in BNB_BLOCKSIZES:
            valid = ", ".join(map(str, BNB_BLOCKSIZES))
            raise ValueError(f"unsupported bitsandbytes block size {self.blocksize!r}; valid: {valid}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be a bool, got {self.double_quant!r}")
        if self.kind == "int8" and (self.blocksize != DEFAULT_BLOCKSIZE or self.double_quant):
            raise ValueError("int8 is row-wise: it takes no block size and no double quantization")

    @property
    def bits(self) -> int:
        """Bits per code: 4 or 8."""
        return 8 if self.kind == "int8" else 4

    @property
    def full_name(self) -> str:
        """``"nf4"``, ``"fp4-b128"``, ``"nf4-dq"``, ``"int8"``; ``parse_bnb_type`` reads it back."""
        name = self.kind
        if self.blocksize != DEFAULT_BLOCKSIZE:
            name += f"-b{self.blocksize}"
        return name + "-dq" if self.double_quant else name

    def __str__(self) -> str:
        return self.full_name


def parse_bnb_type(text: str) -> BnbType:
    """Parse a bitsandbytes type name such as ``"nf4"``, ``"fp4-b128"``, ``"nf4-dq"`` or ``"int8"``.

    Args:
        text: ``<kind>[-b<blocksize>][-dq]``; case and surrounding spaces are ignored.

    Returns:
        The parsed ``BnbType``.

    Raises:
        ValueError: when the text is malformed or names an unknown kind or unsupported block size.
    """
    if not isinstance(text, str):
        raise ValueError(f"bitsandbytes type must be a string, got {type(text).__name__}")
    m = _BNB_TYPE_RE.match(text.strip().lower())
    if m is None:
        raise ValueError(f"malformed bitsandbytes type {text!r}; expected e.g. nf4, fp4-b128, nf4-dq, int8")
    kind, blocksize, dq = m.groups()
    return BnbType(kind, DEFAULT_BLOCKSIZE if blocksize is None else int(blocksize), dq is not None)


def as_btype(btype: BnbType | str) -> BnbType:
    """A ``BnbType`` from itself or its name.

    Args:
        btype: a ``BnbType`` or a name ``parse_bnb_type`` reads.

    Returns:
        The type.

    Raises:
        ValueError: when ``btype`` is neither.
    """
    if isinstance(btype, BnbType):
        return btype
    if isinstance(btype, str):
        return parse_bnb_type(btype)
    raise ValueError(f"btype must be a BnbType or a type name, got {type(btype).__name__}")
