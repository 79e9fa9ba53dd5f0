"""Files a checkpoint names are read only from inside the checkpoint's folder.

A manifest or an index comes from whoever published the checkpoint; a name in it that is
absolute, climbs out with ``..``, or is a link leading elsewhere (``/dev/zero``, a file of the
user's) is refused before it is opened. The one exception is the Hugging Face hub cache, where a
snapshot's files are links into the same repository's ``blobs/`` folder.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from moe_local.errors import CheckpointError


def allowed_root(folder: Path) -> Path:
    """The folder a checkpoint's files may resolve into: the folder, or its hub-cache repository."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        return real.parent.parent
    return real


def file_inside(folder: Path, name: object, what: str) -> Path:
    """``folder / name``, checked to be a regular file that lies inside ``folder``.

    Args:
        folder: the checkpoint folder.
        name: a relative file name from the checkpoint's own metadata.
        what: which metadata named it, for the message (e.g. "moe_local.json layer 3").

    Returns:
        The path to open.

    Raises:
        CheckpointError: the name is not a plain relative name, leads outside the folder, or is
            not a regular file (a device, a pipe, a folder).
    """
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name):
        raise CheckpointError(f"{what} names {name!r}: not a file name inside {folder}; refusing it")
    path = folder / name
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(allowed_root(folder)):
        raise CheckpointError(
            f"{what} names {name!r}, which leads outside {folder} (to {real}); "
            "moe-local reads only files inside the model folder"
        )
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError as exc:
        raise CheckpointError(f"{what} names {name!r}, which is missing from {folder}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{what} names {name!r}, which is not a regular file")
    return path
