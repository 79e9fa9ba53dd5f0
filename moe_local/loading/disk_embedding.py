"""An input embedding table left on disk: a lookup reads the rows it needs from the file.

A decode step needs one row of the ``[V, H]`` table, a prompt a few hundred, yet the table is
often the biggest dense tensor (Mixtral-8x7B 250 MiB, Qwen3-30B-A3B 593 MiB, DeepSeek-V3 1.7 GiB
in bf16). Under a memory budget smaller than the model every byte kept there is a byte of experts
the cache cannot hold, so a budgeted load leaves an untied table where it lies and reads rows with
``pread`` (through the page cache, which a cap reclaims; llama.cpp gets the same from mmap).

Only a plain ``nn.Embedding`` whose table is stored unquantized in one safetensors file and not
shared with the output projection qualifies (``find_table``); anything else loads as before.

Shapes: [...] token ids, [..., H] embeddings.  V=vocabulary rows, H=embedding width.
"""

from __future__ import annotations

import os
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_local.errors import CheckpointError
from moe_local.format.direct_read import pread_into, read_range

_VERIFY_CHUNK = 16 << 20  # bytes per read while the table's checksum is verified


@dataclass(frozen=True)
class TableSource:
    """Where an embedding table lies on disk.

    Attributes:
        name: the module's name in the model (``model.embed_tokens``).
        path: the safetensors file holding it.
        offset: the table's first byte in that file.
        shape: ``(V, H)``.
        dtype: the dtype it is stored in.
        crc32: its checksum where the folder records one (a moe-local folder), else None.
    """

    name: str
    path: Path
    offset: int
    shape: tuple[int, int]
    dtype: torch.dtype
    crc32: int | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the table as stored."""
        return self.shape[0] * self.shape[1] * self.dtype.itemsize


def find_table(ckpt) -> TableSource | None:
    """The input embedding of ``ckpt`` (a ``Checkpoint``) when it can stay on disk, else None."""
    from moe_local.format.manifest import DENSE_FILE
    from moe_local.format.safetensors_io import CheckpointFiles, SafetensorsFile
    from moe_local.loading.checkpoint import HF, MOE_LOCAL

    meta = ckpt.meta
    try:  # a model class may not say (transformers raises NotImplementedError)
        table = meta.get_input_embeddings()
        out = meta.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if type(table) is not nn.Embedding or table.weight.dim() != 2:
        return None  # a scaled or quantized table computes more than a row lookup
    text = getattr(ckpt.config, "get_text_config", lambda: ckpt.config)()
    if getattr(text, "tie_word_embeddings", False) or (out is not None and out.weight is table.weight):
        return None  # the output projection reads the whole table every step
    name = next((n for n, m in meta.named_modules() if m is table), None)
    if name is None:
        return None
    key = f"{name}.weight"
    shape = tuple(table.weight.shape)
    if ckpt.kind == MOE_LOCAL:
        if (ckpt.manifest or {}).get("dense", {}).get(key) != "keep":
            return None
        f = SafetensorsFile(ckpt.path / DENSE_FILE)
        crc = (ckpt.manifest.get("dense_crc32") or {}).get(key)
        found = f.tensors.get(key)
        path = f.path
    elif ckpt.kind == HF and isinstance(ckpt.files, CheckpointFiles) and key in ckpt.renamed:
        stored = ckpt.renamed[key]
        if stored in ckpt.experts.claimed or key in ckpt.converted or stored not in ckpt.files.key_to_file:
            return None
        found, crc = ckpt.files.info(stored), None
        path = ckpt.files.key_to_file[stored].path
    else:
        return None
    if found is None or tuple(found.shape) != shape or not found.dtype.is_floating_point:
        return None
    return TableSource(name, path, found.offset, shape, found.dtype, crc)


def verify(source: TableSource) -> None:
    """Check the table's checksum by reading it once in chunks (none of it kept or cached).

    Raises:
        CheckpointError: the file is short or the bytes do not match the recorded checksum.
    """
    if source.crc32 is None:
        return
    crc, done = 0, 0
    try:
        while done < source.nbytes:
            n = min(_VERIFY_CHUNK, source.nbytes - done)
            crc = zlib.crc32(memoryview(read_range(source.path, source.offset + done, n).numpy()), crc)
            done += n
    except OSError as exc:
        raise CheckpointError(f"cannot read {source.path.name}: {exc}") from exc
    if crc & 0xFFFFFFFF != source.crc32:
        raise CheckpointError(f"{source.path}: {source.name}.weight fails its checksum (corrupt file)")


class DiskEmbedding(nn.Module):
    """``nn.Embedding`` whose table stays in its file; each lookup reads the distinct rows asked for.

    Attributes:
        num_embeddings: ``V``.
        embedding_dim: ``H``.
        out_dtype: the dtype lookups return (the model's compute dtype).
    """

    def __init__(self, source: TableSource, dtype: torch.dtype, padding_idx: int | None = None) -> None:
        super().__init__()
        self.source = source
        self.num_embeddings, self.embedding_dim = source.shape
        self.padding_idx = padding_idx
        self.out_dtype = dtype
        self._row_bytes = self.embedding_dim * source.dtype.itemsize
        # opened once, not per lookup (a decode step looks up one row); closed with the module
        try:
            self._fd = os.open(source.path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"cannot open {source.path.name} for its embedding rows: {exc}") from exc
        weakref.finalize(self, os.close, self._fd)

    @property
    def weight(self) -> torch.Tensor:
        """A meta tensor of the table's shape and dtype (for code that asks its shape, never its values)."""
        return torch.empty(self.source.shape, dtype=self.out_dtype, device="meta")

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on disk: {self.source.path.name}"

    def _apply(self, fn, recurse: bool = True) -> DiskEmbedding:
        # there is no tensor to move; a dtype cast changes what lookups return
        probe = fn(torch.empty(0, dtype=self.out_dtype))
        if probe.device.type != "cpu":
            raise CheckpointError("an embedding table left on disk is read on the CPU only")
        self.out_dtype = probe.dtype
        return super()._apply(fn, recurse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., H]
        flat = ids.reshape(-1).to("cpu", torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        unique, inverse = torch.unique(flat, return_inverse=True)
        rows = torch.empty((unique.numel(), self.embedding_dim), dtype=self.source.dtype)  # [U, H]
        raw = rows.view(torch.uint8).view(-1)
        try:
            for i, row in enumerate(unique.tolist()):
                start = self.source.offset + row * self._row_bytes
                part = raw[i * self._row_bytes : (i + 1) * self._row_bytes]
                pread_into(self._fd, memoryview(part.numpy()), start)
        except OSError as exc:
            raise CheckpointError(f"cannot read embedding rows from {self.source.path.name}: {exc}") from exc
        return rows.to(self.out_dtype)[inverse].reshape(*ids.shape, self.embedding_dim)
