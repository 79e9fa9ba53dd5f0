"""Read a moe-local folder: dense weights (some as QuantLinear) and experts one blob at a time."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from moe_local.errors import CheckpointError, ExpertBlobError
from moe_local.experts.sites import ExpertsSite
from moe_local.experts.weights import ExpertWeights
from moe_local.format.blob import Slot, checksum, tensor_checksum, unpack_blob
from moe_local.format.dense import embedding_named, linear_named
from moe_local.format.direct_read import read_range
from moe_local.format.manifest import DENSE_FILE
from moe_local.format.paths import file_inside
from moe_local.format.safetensors_io import SafetensorsFile
from moe_local.format.source import ExpertSource

_log = logging.getLogger(__name__)


def _scheme(name: object, what: str):
    """Parse a scheme name from a manifest, as a one-line error when it is not one."""
    from moe_local.quant.api import parse_scheme

    try:
        if not isinstance(name, str):
            raise ValueError("not a string")
        return parse_scheme(name)
    except ValueError as exc:
        raise CheckpointError(f"manifest gives {what} the unknown scheme {name!r} ({exc})") from exc


def _check_entry(folder: Path, layer: int, entry: dict) -> list[Slot]:
    """Check one layer's manifest entry against its blob file before anything is read or allocated.

    Returns:
        The layer's blob layout.

    ``read_manifest`` has checked the fields' types already.

    Raises:
        CheckpointError: a file outside the folder, a slot that does not parse, a blob or tensor
            that lies past the end of its file or blob.
    """
    what = f"moe_local.json layer {layer}"
    path = file_inside(folder, entry.get("file"), what)
    size = path.stat().st_size
    try:
        slots = [Slot.from_json(s) for s in entry["slots"]]
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"{what} has a malformed slot ({type(exc).__name__}: {exc})") from exc
    for e, blob in enumerate(entry["experts"]):
        offset, length, _ = blob
        if offset + length > size:
            raise ExpertBlobError(
                layer,
                e,
                f"{entry['file']} is truncated or the manifest is corrupt: the blob ends at byte "
                f"{offset + length} but the file has {size}",
            )
        for slot in slots:
            if slot.offset < 0 or slot.nbytes < 0 or slot.offset + slot.nbytes > length:
                raise CheckpointError(f"{what}: tensor {slot.name} lies outside expert {e}'s blob")
    return slots


class BlobExperts(ExpertSource):
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
        super().__init__(dtype, drop_cache)
        self.folder = folder
        self.layers: dict[int, dict] = {}
        self.slots: dict[int, list[Slot]] = {}
        self.qtypes: dict[int, dict[str, object]] = {}
        self.verified: set[tuple[int, int]] = set()
        for site in sites:
            entry = manifest["layers"].get(str(site.layer))
            if entry is None or not isinstance(entry.get("experts"), list):
                raise CheckpointError(
                    f"{folder}: manifest does not describe the experts of layer {site.layer}"
                )
            if len(entry["experts"]) != site.num_experts:
                raise CheckpointError(
                    f"{folder}: manifest lists {len(entry['experts'])} experts for layer {site.layer}; "
                    f"the config has {site.num_experts}"
                )
            self.slots[site.layer] = _check_entry(folder, site.layer, entry)
            self.layers[site.layer] = entry
            self.qtypes[site.layer] = {
                p: _scheme(s, f"layer {site.layer} {p}") for p, s in entry["schemes"].items() if s != "keep"
            }

    def expert_nbytes(self, layer: int) -> int:
        """Bytes of one expert of ``layer`` as stored."""
        return int(self.layers[layer]["experts"][0][1])

    def read(self, layer: int, expert: int) -> ExpertWeights:
        """Read, verify and unpack one expert."""
        from moe_local.quant.api import rebuild

        entry = self.layers[layer]
        offset, length, crc = entry["experts"][expert]
        path = self.folder / entry["file"]  # checked to lie inside the folder by _check_entry
        try:
            # a budgeted load reads past the page cache (O_DIRECT where it can), others through it
            blob = read_range(path, offset, length, direct=self.drop_cache, element=8, drop=self.drop_cache)
        except OSError as exc:  # an error of open() names the file; one of reading does not
            what = f"cannot open {entry['file']} ({exc.strerror})" if exc.filename else None
            raise ExpertBlobError(layer, expert, what or f"{entry['file']} is truncated ({exc})") from exc
        if (layer, expert) not in self.verified:
            if checksum(memoryview(blob.numpy())) != crc:
                raise ExpertBlobError(layer, expert, f"checksum mismatch in {entry['file']} (corrupt file)")
            self.verified.add((layer, expert))
        raw = unpack_blob(blob, self.slots[layer])
        parts: dict[str, object] = {}
        for part, shape in entry["shapes"].items():
            qtype = self.qtypes[layer].get(part)
            if qtype is None:
                if part not in raw:
                    raise ExpertBlobError(layer, expert, f"the blob layout has no tensor {part}")
                t = raw[part]
                parts[part] = t.to(self.dtype) if t.is_floating_point() else t
            else:
                prefix = f"{part}."
                tensors = {k.removeprefix(prefix): v for k, v in raw.items() if k.startswith(prefix)}
                try:
                    parts[part] = rebuild(tensors, tuple(shape), qtype)
                except (ValueError, RuntimeError, KeyError) as exc:
                    raise ExpertBlobError(layer, expert, f"{part} does not match its scheme ({exc})") from exc
        parts = _kernel_layout(parts)
        try:
            return ExpertWeights(**parts)
        except TypeError as exc:
            raise ExpertBlobError(
                layer, expert, f"the manifest lists parts {sorted(parts)}, not an expert's"
            ) from exc


def _kernel_layout(parts: dict[str, object]) -> dict[str, object]:
    """The expert's native-kernel weights with each row's codes, scales and zeros side by side, in one
    new buffer (``moe_local.quant.interleave``: one stream through memory); the read blob goes."""
    from moe_local.quant.interleave import interleavable, interleave

    names = [name for name, w in parts.items() if interleavable(w)]
    if not names:
        return parts
    return {**parts, **dict(zip(names, interleave([parts[n] for n in names]), strict=True))}


def load_dense(
    lm: nn.Module, folder: Path, manifest: dict, dtype: torch.dtype, *, drop_cache: bool = False
) -> int:
    """Load the dense weights of a moe-local folder into the meta model; return their bytes.

    Linear weights stored quantized become ``QuantLinear`` modules in place of ``nn.Linear``.
    """
    from moe_local.quant.api import make_linear_module, rebuild
    from moe_local.quant.embedding import QuantEmbedding
    from moe_local.quant.interleave import interleavable, interleave

    f = SafetensorsFile(file_inside(folder, DENSE_FILE, "the moe-local folder"), drop_cache=drop_cache)
    sums: dict[str, int] | None = manifest.get("dense_crc32")
    if sums is None:
        _log.warning(
            "note: %s was written by an older moe-local without checksums of its dense part; "
            "quantize it again to have every byte verified",
            folder,
        )

    def read(key: str) -> torch.Tensor:
        if key not in f.tensors:
            raise CheckpointError(f"{folder / DENSE_FILE} lacks {key}, which the manifest lists")
        t = f.read(key)
        if sums is not None and tensor_checksum(t) != sums.get(key):
            raise CheckpointError(f"{folder / DENSE_FILE}: {key} fails its checksum (corrupt file)")
        return t

    kept: dict[str, torch.Tensor] = {}
    total = 0
    schemes: dict[str, str] = manifest["dense"]
    quantized = {n for n, s in schemes.items() if s != "keep"}
    wanted = lm.state_dict(keep_vars=True)  # a table left on disk (DiskEmbedding) is not read here
    for name, scheme in schemes.items():
        if scheme == "keep" and name in wanted:
            t = read(name)
            kept[name] = t.to(dtype) if t.is_floating_point() else t
            total += kept[name].numel() * kept[name].element_size()
    for name in quantized:
        mod_name = name.removesuffix(".weight")
        linear = linear_named(lm, mod_name)
        table = embedding_named(lm, mod_name) if linear is None else None
        if linear is None and table is None:
            raise CheckpointError(f"manifest quantizes {name}, which is not a linear weight of this model")
        prefix = f"{name}."
        tensors = {k.removeprefix(prefix): read(k) for k in f.tensors if k.startswith(prefix)}
        shape = (linear.out_features, linear.in_features) if linear is not None else tuple(table.weight.shape)
        try:
            qt = rebuild(tensors, shape, _scheme(schemes[name], name))
            if linear is not None and interleavable(qt):
                qt = interleave([qt])[0]  # one stream through memory per row (moe_local.quant.interleave)
            module = (
                make_linear_module(qt, kept.pop(f"{mod_name}.bias", None))
                if linear is not None
                else QuantEmbedding(qt, dtype, table.padding_idx)
            )
        except (ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{folder / DENSE_FILE}: {name} does not match its scheme ({exc})") from exc
        lm.set_submodule(mod_name, module)
        total += qt.nbytes
    lm.load_state_dict(kept, strict=False, assign=True)
    return total
