"""Sizes and counts as users write and read them: ``700MiB`` in, ``1.5 GiB`` and ``46.7B`` out."""

from __future__ import annotations

import math
import re

from moe_local.errors import MoeLocalError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1024, "mi": 1024**2, "gi": 1024**3}
_UNITS["ti"] = 1024**4


def parse_size(text: str | int | None) -> int | None:
    """Parse a memory size such as ``"700MiB"``, ``"22GiB"``, ``"1.5GB"`` or ``4096`` into bytes.

    Args:
        text: the size; None passes through.

    Returns:
        Bytes, or None.

    Raises:
        MoeLocalError: the text is not a size, or is negative.
    """
    if text is None:
        return None
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise MoeLocalError(f"not a memory size: {text!r} (examples: 700MiB, 22GiB, 1.5GB)")
    if isinstance(text, int):
        if text < 0:
            raise MoeLocalError(f"a memory size cannot be negative: {text}")
        return text
    m = _SIZE_RE.match(text)
    if m is None:
        raise MoeLocalError(f"not a memory size: {text!r} (examples: 700MiB, 22GiB, 1.5GB)")
    unit = (m.group(2) or "").lower().removesuffix("b")
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value):  # hundreds of digits: float() overflows to inf
        shown = text.strip() if len(text.strip()) <= 24 else text.strip()[:20] + "..."
        raise MoeLocalError(f"not a memory size: {shown!r} is too large to be one")
    return int(value)


def human_bytes(n: float) -> str:
    """Format bytes with binary units: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    """Format a parameter count: ``46.7B``, ``12.9M``."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))
