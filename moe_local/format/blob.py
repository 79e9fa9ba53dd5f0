"""One expert = one contiguous blob: all its tensors back to back, so moving it is one copy.

A blob's layout (names, dtypes, shapes, offsets) is the same for every expert of a layer and is
kept in the manifest; the blob itself is raw bytes, padded to ``ALIGN`` in its file and guarded
by a CRC-32 checked on first read.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from moe_local.format.safetensors_io import DTYPE_NAMES, DTYPES

ALIGN = 4096  # blob start and length in the file: page-aligned for direct I/O
_INNER_ALIGN = 64  # tensor start inside a blob: cache-line aligned views


@dataclass(frozen=True)
class Slot:
    """Where one tensor lies inside a blob."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "U8", "F16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_json(self) -> dict:
        """JSON form for the manifest."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset}

    @staticmethod
    def from_json(d: dict) -> Slot:
        """Inverse of ``to_json``."""
        dtype = DTYPES[d["dtype"]]
        n = torch.Size(d["shape"]).numel() * torch.empty((), dtype=dtype).element_size()
        return Slot(d["name"], d["dtype"], tuple(d["shape"]), int(d["offset"]), n)


def round_up(n: int, to: int = ALIGN) -> int:
    """Round ``n`` up to a multiple of ``to``."""
    return (n + to - 1) // to * to


def layout_of(tensors: dict[str, torch.Tensor]) -> tuple[list[Slot], int]:
    """Plan a blob for ``tensors`` (in their order); return the slots and the blob's length."""
    slots, pos = [], 0
    for name, t in tensors.items():
        pos = round_up(pos, _INNER_ALIGN)
        nbytes = t.numel() * t.element_size()
        slots.append(Slot(name, DTYPE_NAMES[t.dtype], tuple(t.shape), pos, nbytes))
        pos += nbytes
    return slots, pos


def pack_blob(tensors: dict[str, torch.Tensor], slots: list[Slot], length: int) -> bytes:
    """Serialize ``tensors`` into one blob following ``slots``."""
    buf = bytearray(length)
    for slot in slots:
        t = tensors[slot.name].detach().contiguous().cpu()
        if tuple(t.shape) != slot.shape or DTYPE_NAMES[t.dtype] != slot.dtype:
            raise ValueError(f"tensor {slot.name} does not match the layer's blob layout")
        # reshape first: [O, 1] with strides (1, O) counts as contiguous but cannot be viewed as bytes
        buf[slot.offset : slot.offset + slot.nbytes] = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return bytes(buf)


def unpack_blob(blob: torch.Tensor, slots: list[Slot]) -> dict[str, torch.Tensor]:
    """Views of each tensor inside ``blob`` (a uint8 tensor); no copy."""
    out = {}
    for slot in slots:
        raw = blob[slot.offset : slot.offset + slot.nbytes]
        out[slot.name] = raw.view(DTYPES[slot.dtype]).reshape(slot.shape)
    return out


def checksum(data: bytes | memoryview) -> int:
    """CRC-32 of a blob."""
    return zlib.crc32(data) & 0xFFFFFFFF


def tensor_checksum(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes as stored (used for the dense part, tensor by tensor)."""
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return checksum(memoryview(raw.numpy()))
