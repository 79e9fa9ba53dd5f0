"""Turn a MODEL argument into a local folder: a path, or a hub id already in the local cache."""

from __future__ import annotations

import re
from pathlib import Path

from moe_local.errors import CheckpointError, MoeLocalError, first_line

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(model: str | Path, *, download: bool = False) -> Path:
    """Find the folder that holds MODEL.

    Args:
        model: a folder, or a Hugging Face hub id such as ``mistralai/Mixtral-8x7B-v0.1``.
        download: fetch a hub id that is not in the local cache (needs a network).

    Returns:
        The folder holding config.json and the weights.

    Raises:
        MoeLocalError: MODEL is neither a folder nor a cached hub id.
    """
    try:
        path = Path(model).expanduser()
    except RuntimeError as exc:  # "~user" of a user this machine does not have
        raise MoeLocalError(f"no such model folder: {model} (cannot expand the ~ in it)") from exc
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} has no config.json: not a Hugging Face or moe-local model folder")
        return path
    if path.exists():
        raise MoeLocalError(f"{path} is a file; MODEL must be a model folder or a hub id")
    text = str(model)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise MoeLocalError(f"no such model folder: {text}")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise MoeLocalError("huggingface_hub is needed to resolve hub ids") from exc
    from huggingface_hub.errors import IncompleteSnapshotError

    from moe_local.hub import ALLOW_PATTERNS, NEVER_PATTERNS  # the files `moe-local pull` fetches

    try:
        folder = snapshot_download(
            text,
            local_files_only=not download,
            allow_patterns=list(ALLOW_PATTERNS),
            ignore_patterns=list(NEVER_PATTERNS),
        )
    except IncompleteSnapshotError as exc:
        raise MoeLocalError(f"{text} is only partly downloaded; run `moe-local pull {text}` again") from exc
    except LocalEntryNotFoundError as exc:
        raise MoeLocalError(
            f"{text} is neither a folder nor a model in the local Hugging Face cache; "
            "pass --download to fetch it (needs a network)"
        ) from exc
    except Exception as exc:  # network and hub errors carry long messages: keep one line
        first = first_line(exc)
        raise MoeLocalError(f"cannot fetch {text}: {first}") from exc
    return resolve_model_path(folder)
