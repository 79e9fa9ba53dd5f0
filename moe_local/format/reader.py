"""Read a moe-local folder: dense weights (some as QuantLinear) and experts one blob at a time."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from moe_local.errors import CheckpointError, ExpertBlobError
from moe_local.experts.weights import ExpertWeights
from moe_local.format.blob import Slot, checksum, unpack_blob
from moe_local.format.manifest import DENSE_FILE
from moe_local.loading.families import ExpertsSite
from moe_local.loading.safetensors_io import SafetensorsFile, pread_into


class BlobExperts:
    """Reads expert (layer, e) of a moe-local folder with one read, verified by CRC-32 on first read.

    Args:
        folder: the moe-local folder.
        manifest: its parsed ``moe_local.json``.
        sites: the model's experts modules (to check the manifest covers each).
        dtype: dtype for experts' unquantized tensors (biases, kept weights).
        drop_cache: evict read bytes from the page cache (a RAM budget must hold).
    """

    def __init__(
        self, folder: Path, manifest: dict, sites: list[ExpertsSite], dtype: torch.dtype, drop_cache: bool
    ) -> None:
        from moe_local.quant.api import parse_scheme

        self.folder = folder
        self.dtype = dtype
        self.drop_cache = drop_cache
        self.layers: dict[int, dict] = {}
        self.slots: dict[int, list[Slot]] = {}
        self.qtypes: dict[int, dict[str, object]] = {}
        self.verified: set[tuple[int, int]] = set()
        for site in sites:
            entry = manifest["layers"].get(str(site.layer))
            if entry is None or len(entry["experts"]) != site.num_experts:
                raise CheckpointError(
                    f"{folder}: manifest does not describe the experts of layer {site.layer}"
                )
            self.layers[site.layer] = entry
            self.slots[site.layer] = [Slot.from_json(s) for s in entry["slots"]]
            self.qtypes[site.layer] = {p: parse_scheme(s) for p, s in entry["schemes"].items() if s != "keep"}

    def expert_nbytes(self, layer: int) -> int:
        """Bytes of one expert of ``layer`` as stored."""
        return int(self.layers[layer]["experts"][0][1])

    def read(self, layer: int, expert: int) -> ExpertWeights:
        """Read, verify and unpack one expert."""
        from moe_local.quant.api import rebuild

        entry = self.layers[layer]
        offset, length, crc = entry["experts"][expert]
        blob = torch.empty(length, dtype=torch.uint8)
        path = self.folder / entry["file"]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ExpertBlobError(layer, expert, f"cannot open {entry['file']} ({exc.strerror})") from exc
        try:
            pread_into(fd, memoryview(blob.numpy()), offset)
            if self.drop_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise ExpertBlobError(layer, expert, f"{entry['file']} is truncated ({exc})") from exc
        finally:
            os.close(fd)
        if (layer, expert) not in self.verified:
            if checksum(memoryview(blob.numpy())) != crc:
                raise ExpertBlobError(layer, expert, f"checksum mismatch in {entry['file']} (corrupt file)")
            self.verified.add((layer, expert))
        raw = unpack_blob(blob, self.slots[layer])
        parts: dict[str, object] = {}
        for part, shape in entry["shapes"].items():
            qtype = self.qtypes[layer].get(part)
            if qtype is None:
                t = raw[part]
                parts[part] = t.to(self.dtype) if t.is_floating_point() else t
            else:
                prefix = f"{part}."
                tensors = {k.removeprefix(prefix): v for k, v in raw.items() if k.startswith(prefix)}
                parts[part] = rebuild(tensors, tuple(shape), qtype)
        return ExpertWeights(**parts)


def load_dense(lm: nn.Module, folder: Path, manifest: dict, dtype: torch.dtype) -> int:
    """Load the dense weights of a moe-local folder into the meta model; return their bytes.

    Linear weights stored quantized become ``QuantLinear`` modules in place of ``nn.Linear``.
    """
    from moe_local.quant.api import make_linear_module, parse_scheme, rebuild

    f = SafetensorsFile(folder / DENSE_FILE)
    kept: dict[str, torch.Tensor] = {}
    total = 0
    schemes: dict[str, str] = manifest["dense"]
    quantized = {n for n, s in schemes.items() if s != "keep"}
    for name, scheme in schemes.items():
        if scheme == "keep":
            t = f.read(name)
            kept[name] = t.to(dtype) if t.is_floating_point() else t
            total += kept[name].numel() * kept[name].element_size()
    for name in quantized:
        mod_name = name.removesuffix(".weight")
        linear = lm.get_submodule(mod_name)
        prefix = f"{name}."
        tensors = {k.removeprefix(prefix): f.read(k) for k in f.tensors if k.startswith(prefix)}
        qt = rebuild(tensors, (linear.out_features, linear.in_features), parse_scheme(schemes[name]))
        bias = kept.pop(f"{mod_name}.bias", None)
        parent_name, _, attr = mod_name.rpartition(".")
        parent = lm.get_submodule(parent_name) if parent_name else lm
        setattr(parent, attr, make_linear_module(qt, bias))
        total += qt.nbytes
    lm.load_state_dict(kept, strict=False, assign=True)
    return total
