"""``moe_local.json``: the manifest of a quantized folder (format version, source, schemes, blobs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from moe_local.errors import CheckpointError

MANIFEST = "moe_local.json"
FORMAT_VERSION = 1
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
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is corrupt ({exc})") from exc
    if data.get("format") != "moe-local" or data.get("version") != FORMAT_VERSION:
        found = f"{data.get('format')} v{data.get('version')}"
        raise CheckpointError(f"{path} is format {found}; this moe-local reads v{FORMAT_VERSION}")
    return data


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so it is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
