"""``moe_local.json``: the manifest of a quantized folder (format version, source, schemes, blobs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from moe_local.errors import CheckpointError

MANIFEST = "moe_local.json"
FORMAT_VERSION = 2  # 2: the dense tensors are checksummed too ("dense_crc32")
READABLE_VERSIONS = (1, 2)
DENSE_FILE = "dense.safetensors"


def read_manifest(folder: Path) -> dict:
    """Read and check a folder's manifest.

    Raises:
        CheckpointError: missing, unparsable, or of a format version this moe-local cannot read.
    """
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{folder} has no {MANIFEST}: not a finished moe-local folder") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({type(exc).__name__})") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt (not a JSON object)")
    if data.get("format") != "moe-local" or data.get("version") not in READABLE_VERSIONS:
        found = f"{data.get('format')} v{data.get('version')}"
        raise CheckpointError(f"{path} is format {found}; this moe-local reads v{FORMAT_VERSION}")
    _check_shape(path, data)
    return data


def _check_shape(path: Path, data: dict) -> None:
    """The manifest's top level has the types every reader relies on (entries are checked on use)."""
    layers, dense = data.get("layers"), data.get("dense")
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise CheckpointError(f"{path} is corrupt: 'layers' must map layer numbers to entries")
    if not isinstance(dense, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in dense.items()
    ):
        raise CheckpointError(f"{path} is corrupt: 'dense' must map tensor names to scheme names")
    for layer, entry in layers.items():
        if not layer.isdigit():
            raise CheckpointError(f"{path} is corrupt: layer key {layer!r} is not a layer number")
        _check_entry(f"{path.name} layer {layer}", entry)
    sums = data.get("dense_crc32")
    if data["version"] >= 2 and (
        not isinstance(sums, dict) or not all(isinstance(v, int) for v in sums.values())
    ):
        raise CheckpointError(f"{path} is corrupt: 'dense_crc32' must map tensor names to checksums")


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(what: str, entry: dict) -> None:
    """A layer entry's fields have the types readers index into (sizes are checked against files later)."""
    experts, schemes, shapes, slots = (entry.get(k) for k in ("experts", "schemes", "shapes", "slots"))
    if not isinstance(entry.get("file"), str):
        raise CheckpointError(f"{what} is malformed: 'file' must be a file name")
    if not isinstance(experts, list) or not experts:
        raise CheckpointError(f"{what} is malformed: 'experts' must list the layer's blobs")
    for e, blob in enumerate(experts):
        if not (isinstance(blob, list) and len(blob) == 3 and all(_count(v) for v in blob)):
            raise CheckpointError(f"{what} expert {e}: expected [offset, length, crc32], got {blob!r}")
    if not isinstance(schemes, dict) or not all(isinstance(v, str) for v in schemes.values()):
        raise CheckpointError(f"{what} is malformed: 'schemes' must map parts to scheme names")
    if not isinstance(shapes, dict) or not all(
        isinstance(s, list) and all(_count(d) for d in s) for s in shapes.values()
    ):
        raise CheckpointError(f"{what} is malformed: 'shapes' must map parts to lists of sizes")
    if not isinstance(slots, list) or not all(
        isinstance(s, dict) and isinstance(s.get("name"), str) for s in slots
    ):
        raise CheckpointError(f"{what} is malformed: 'slots' must list the blob's tensors")


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so it is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
