"""A small safetensors reader built on ``os.pread``: no mmap, no pickle.

Reading with pread into buffers we own keeps resident memory equal to what we keep,
instead of leaving touched mmap pages in RSS; ``drop_cache`` also keeps the bytes read out of
the OS page cache (``O_DIRECT``, or read and then dropped where a filesystem refuses it:
``moe_local.format.direct_read``) so a RAM budget holds for the whole process (a cgroup charges
the page cache it fills to its limit). It is asked per read, or for every read of a file
(``SafetensorsFile(path, drop_cache=True)``, ``CheckpointFiles(folder, drop_cache=True)``):
the dense part, read once, then leaves no cached copy behind either.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_local.errors import CheckpointError
from moe_local.format.direct_read import pread_into, read_joined, read_range
from moe_local.format.paths import file_inside

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "C64": torch.complex64,
}
# every dtype safetensors 0.8 defines that this torch has a type for (checked by name: older torch lacks some)
for _name, _attr in (
    ("F8_E8M0", "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_SUB_BYTE = ("F4", "F6_E2M3", "F6_E3M2")  # valid safetensors dtypes of under 8 bits: not read yet
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """One ``.safetensors`` file: its header, and reads of whole tensors or leading-dim slices.

    Args:
        path: the file.
        drop_cache: the default of every read's ``drop_cache``: evict what was read from the
            OS page cache.
    """

    def __init__(self, path: str | os.PathLike[str], *, drop_cache: bool = False) -> None:
        self.path = Path(path)
        self.drop_cache = drop_cache
        try:
            self.size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{self.path.name} is not a safetensors file (too short)")
                (header_len,) = struct.unpack("<Q", raw)
                if header_len > min(_MAX_HEADER, self.size - 8):
                    raise CheckpointError(f"{self.path.name} is truncated or not a safetensors file")
                header = json.loads(f.read(header_len))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise CheckpointError(f"missing weights file {self.path}") from exc
            raise CheckpointError(f"{self.path.name} has a corrupt safetensors header ({exc})") from exc
        if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
            raise CheckpointError(
                f"{self.path.name} has a corrupt safetensors header (not a table of tensors)"
            )
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        base = 8 + header_len
        for name, entry in header.items():
            self.tensors[name] = self._parse_entry(name, entry, base)

    def _parse_entry(self, name: str, entry: dict, base: int) -> TensorInfo:
        if isinstance(entry, dict) and entry.get("dtype") in _SUB_BYTE:
            raise CheckpointError(
                f"{self.path.name}: tensor {name} is stored as {entry['dtype']}, "
                "which moe-local cannot read yet"
            )
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.path.name}: tensor {name} has a malformed header entry") from exc
        if begin < 0 or end < begin or any(d < 0 for d in shape):
            raise CheckpointError(f"{self.path.name}: tensor {name} has negative offsets or sizes")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes:
            raise CheckpointError(f"{self.path.name}: tensor {name} size does not match its shape {shape}")
        if base + end > self.size:
            raise CheckpointError(
                f"{self.path.name} is truncated: tensor {name} ends at byte {base + end} "
                f"but the file has {self.size}"
            )
        return TensorInfo(name, dtype, shape, base + begin, nbytes)

    def keys(self) -> list[str]:
        """Return the tensor names in the file."""
        return list(self.tensors)

    def read(
        self, name: str, *, drop_cache: bool | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Read one whole tensor into a new CPU tensor (or into ``out``).

        Args:
            name: tensor name in this file.
            drop_cache: evict the bytes read from the OS page cache afterwards (None: the
                file's default).
            out: a contiguous CPU tensor of the same dtype and number of elements to read into
                (e.g. a slice of a larger buffer, which saves a copy).

        Returns:
            The tensor (``out`` reshaped when given), owning or sharing its memory.
        """
        info = self.tensors[name]
        return self._read_range(info.offset, info.nbytes, info.dtype, info.shape, drop_cache, out)

    def read_joined(self, names: list[str]) -> torch.Tensor | None:
        """Tensors of one dtype read past the page cache straight into one buffer, one after another.

        Returns:
            Their bytes joined, viewed as their dtype and flat, or None where ``read_joined`` of
            ``direct_read`` cannot (the caller reads them one by one).
        """
        infos = [self.tensors[n] for n in names]
        if len({i.dtype for i in infos}) != 1:
            return None
        try:
            data = read_joined(self.path, [(i.offset, i.nbytes) for i in infos])
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path.name}: {exc}") from exc
        if data is None or data.data_ptr() % infos[0].dtype.itemsize:
            return None
        return data.view(infos[0].dtype)

    def read_slice(self, name: str, index: int, *, drop_cache: bool | None = None) -> torch.Tensor:
        """Read ``tensor[index]`` of a tensor along its first dimension (one contiguous range)."""
        info = self.tensors[name]
        if not info.shape or not 0 <= index < info.shape[0]:
            raise CheckpointError(f"{self.path.name}: {name} has no row {index}")
        row = info.nbytes // info.shape[0]
        return self._read_range(info.offset + index * row, row, info.dtype, info.shape[1:], drop_cache)

    def _read_range(
        self,
        offset: int,
        nbytes: int,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        drop_cache: bool | None,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if drop_cache is None:
            drop_cache = self.drop_cache
        if into is not None:
            size = into.numel() * into.element_size()
            if into.dtype != dtype or size != nbytes or not into.is_contiguous():
                where = f"{into.dtype} {list(into.shape)}"
                raise ValueError(f"cannot read {nbytes} bytes of {dtype} into {where}")
            out = into.view(-1).view(torch.uint8)
        if drop_cache:  # past the page cache (O_DIRECT) where the filesystem allows it
            try:
                data = read_range(self.path, offset, nbytes, element=dtype.itemsize)
            except OSError as exc:
                raise CheckpointError(f"cannot read {self.path.name}: {exc}") from exc
            if into is None:
                return data.view(dtype).reshape(shape)
            out.copy_(data)  # one more copy, from an aligned buffer the caller's cannot be
            return out.view(dtype).reshape(shape)
        if into is None:
            out = torch.empty(nbytes, dtype=torch.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if nbytes:
                pread_into(fd, memoryview(out.numpy()), offset)
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path.name}: {exc}") from exc
        finally:
            os.close(fd)
        return out.view(dtype).reshape(shape)


class CheckpointFiles:
    """All safetensors files of a checkpoint folder, as one name -> file map.

    Args:
        folder: the checkpoint folder.
        drop_cache: the default of every read's ``drop_cache`` (see ``SafetensorsFile``).
    """

    def __init__(self, folder: str | os.PathLike[str], *, drop_cache: bool = False) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        self.files: dict[str, SafetensorsFile] = {}
        self.key_to_file: dict[str, SafetensorsFile] = {}
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index.name} is not a valid safetensors index") from exc
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index.name} is not a valid safetensors index (bad weight_map)")
            for shard in sorted(set(weight_map.values())):
                path = file_inside(self.folder, shard, f"{index.name}")
                self.files[shard] = SafetensorsFile(path, drop_cache=drop_cache)
            for key, shard in weight_map.items():
                if key not in self.files[shard].tensors:
                    raise CheckpointError(f"{shard} does not contain {key}, which {index.name} says it holds")
                self.key_to_file[key] = self.files[shard]
        else:
            paths = sorted(self.folder.glob("*.safetensors"))
            if not paths:
                bins = sorted(p.name for p in self.folder.glob("*.bin"))
                hint = (
                    f" (found {bins[0]}: pickle checkpoints are not loaded, convert to safetensors)"
                    if bins
                    else ""
                )
                raise CheckpointError(f"no .safetensors weights in {self.folder}{hint}")
            for p in paths:
                f = SafetensorsFile(
                    file_inside(self.folder, p.name, "the folder listing"), drop_cache=drop_cache
                )
                self.files[p.name] = f
                for key in f.tensors:
                    self.key_to_file[key] = f

    def names(self) -> list[str]:
        """Return every tensor name of the checkpoint."""
        return list(self.key_to_file)

    def info(self, key: str) -> TensorInfo:
        """Return where ``key`` lies."""
        return self.key_to_file[key].tensors[key]

    def read(
        self, key: str, *, drop_cache: bool | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Read tensor ``key`` from whichever shard holds it (into ``out`` when given; None: its default)."""
        return self.key_to_file[key].read(key, drop_cache=drop_cache, out=out)

    def read_joined(self, keys: list[str]) -> torch.Tensor | None:
        """``SafetensorsFile.read_joined`` of tensors in one shard; None when they lie in several."""
        files = {id(self.key_to_file[k]) for k in keys}
        return self.key_to_file[keys[0]].read_joined(keys) if len(files) == 1 else None

    def read_slice(self, key: str, index: int, *, drop_cache: bool | None = None) -> torch.Tensor:
        """Read ``key[index]`` along the first dimension (``drop_cache`` None: the file's default)."""
        return self.key_to_file[key].read_slice(key, index, drop_cache=drop_cache)
