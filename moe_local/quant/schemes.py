"""Quantization schemes: which bit width, group size and method a weight is quantized with.

A scheme is written ``int<bits>-g<group_size>`` (``int4-g64``), optionally followed by
``-<method>`` (``int3-g64-hqq``); the method defaults to ``rtn``. A ``k`` after the group size
(``int4-g32k``, ``int3-g16k-hqq``) stores each group's scale and offset as 8-bit codes under one
fp16 pair per super-block of 256 weights (``moe_local.quant.superblock``), as llama.cpp's k-quants do.
``tern-g<group_size>[k]`` is the ternary scheme: three levels per group (codes 0, 1, 2), stored five
codes to a byte (1.6 bits per weight before scales; ``moe_local.quant.pack.pack_ternary``) and held
in memory as 2-bit codes, so every 2-bit kernel runs it unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moe_local.quant.superblock import CODE_OVERHEAD_BITS, SUPER_OVERHEAD_BITS, SUPERBLOCK_WEIGHTS

VALID_BITS: tuple[int, ...] = (8, 4, 3, 2)
VALID_GROUP_SIZES: tuple[int, ...] = (16, 32, 64, 128)
VALID_METHODS: tuple[str, ...] = ("rtn", "hqq", "gptq")  # gptq needs calibration: see quant.gptq

TERNARY_STORED_BITS = 8 / 5  # five base-3 codes per byte (3**5 = 243 <= 256)
# Bits stored per group on top of the codes: one fp16 scale and one fp16 zero point.
GROUP_OVERHEAD_BITS = 32

_QTYPE_RE = re.compile(r"^(?:int(\d+)|(tern))-g(\d+)(k?)(?:-([a-z]+))?$")


@dataclass(frozen=True)
class QType:
    """A group-wise asymmetric integer quantization scheme.

    Attributes:
        bits: bits per code, one of ``VALID_BITS``.
        group_size: consecutive input-feature weights sharing one scale and zero point.
        method: how scale and zero are chosen: ``"rtn"`` (min/max round-to-nearest) or
            ``"hqq"`` (calibration-free optimization, see ``moe_local.quant.hqq``).
        superblock: scales and offsets stored as 8-bit codes under one fp16 pair per super-block
            (``moe_local.quant.superblock``) instead of an fp16 scale and zero per group.
        ternary: three levels per group (codes 0..2), stored base 3, five codes a byte; ``bits``
            is then 2, the width the codes are held and computed at in memory.
    """

    bits: int
    group_size: int
    method: str = "rtn"
    superblock: bool = False
    ternary: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in VALID_BITS:
            raise ValueError(f"unsupported bits {self.bits!r}; valid: {', '.join(map(str, VALID_BITS))}")
        if isinstance(self.group_size, bool) or self.group_size not in VALID_GROUP_SIZES:
            raise ValueError(
                f"unsupported group size {self.group_size!r}; valid: {', '.join(map(str, VALID_GROUP_SIZES))}"
            )
        if self.method not in VALID_METHODS:
            raise ValueError(f"unsupported method {self.method!r}; valid: {', '.join(VALID_METHODS)}")
        if not isinstance(self.superblock, bool):
            raise ValueError(f"superblock must be True or False, got {self.superblock!r}")
        if self.superblock and self.method == "gptq":
            raise ValueError("super-block scales (the 'k' schemes) are built for rtn and hqq, not gptq")
        if not isinstance(self.ternary, bool):
            raise ValueError(f"ternary must be True or False, got {self.ternary!r}")
        if self.ternary and self.bits != 2:
            raise ValueError(f"ternary codes are held as 2-bit codes: bits must be 2, got {self.bits}")

    @property
    def name(self) -> str:
        """The scheme's short name without the method: ``"int4-g64"``, ``"int4-g32k"``, ``"tern-g64k"``."""
        width = "tern" if self.ternary else f"int{self.bits}"
        return f"{width}-g{self.group_size}{'k' if self.superblock else ''}"

    @property
    def full_name(self) -> str:
        """The name with a non-default method, e.g. ``"int3-g64-hqq"``; ``parse_qtype`` reads it back."""
        return self.name if self.method == "rtn" else f"{self.name}-{self.method}"

    @property
    def qmax(self) -> int:
        """The largest code: ``2**bits - 1``, or 2 for ternary."""
        return 2 if self.ternary else (1 << self.bits) - 1

    @property
    def stored_bits(self) -> float:
        """Bits per code as written to disk: ``bits``, or 1.6 for ternary (five codes a byte)."""
        return TERNARY_STORED_BITS if self.ternary else float(self.bits)

    def __str__(self) -> str:
        return self.full_name


def parse_qtype(text: str, method: str | None = None) -> QType:
    """Parse a scheme name such as ``"int4-g64"`` or ``"int3-g128-hqq"``.

    Args:
        text: ``int<bits>-g<group_size>[k][-<method>]`` or ``tern-g<group_size>[k][-<method>]``;
            case and surrounding spaces are ignored.
        method: the method to use when ``text`` names none (default ``"rtn"``); a method in
            ``text`` must agree with it.

    Returns:
        The parsed ``QType``.

    Raises:
        ValueError: when the text is malformed or names an unsupported bits, group size or method.
    """
    if not isinstance(text, str):
        raise ValueError(f"quantization scheme must be a string like 'int4-g64', got {type(text).__name__}")
    match = _QTYPE_RE.match(text.strip().lower())
    if match is None:
        raise ValueError(f"cannot parse scheme {text!r}; expected e.g. 'int4-g64' or 'int3-g64-hqq'")
    ternary = match.group(2) == "tern"
    bits = 2 if ternary else int(match.group(1))
    group_size, named_method = int(match.group(3)), match.group(5)
    superblock = match.group(4) == "k"
    if named_method is not None and method is not None and named_method != method:
        raise ValueError(f"scheme {text!r} names method {named_method!r} but {method!r} was requested")
    return QType(bits, group_size, named_method or method or "rtn", superblock, ternary)


def bits_per_weight(qtype: QType) -> float:
    """Return the storage cost per weight in bits, each group's scale and zero included.

    Args:
        qtype: the scheme.

    Returns:
        ``bits + 32 / group_size``, e.g. 4.5 for ``int4-g64``; for super-block schemes
        ``bits + 16 / group_size + 32 / 256``, e.g. 4.625 for ``int4-g32k``; ternary codes count
        1.6 bits (``tern-g64k``: 1.975).
    """
    if qtype.superblock:
        per_super = max(SUPERBLOCK_WEIGHTS, qtype.group_size)
        return qtype.stored_bits + CODE_OVERHEAD_BITS / qtype.group_size + SUPER_OVERHEAD_BITS / per_super
    return qtype.stored_bits + GROUP_OVERHEAD_BITS / qtype.group_size
