"""Output folders: moe-local only ever replaces what moe-local wrote.

Every command that writes a folder (``quantize``, the GPTQ export, ``synth``, ``demo``,
``--offload-dir``) goes through here, so one rule holds for all of them:

- OUT is never SRC, never contains SRC and never lies inside SRC;
- an existing OUT is replaced only with ``--overwrite``, and only when it is a moe-local output
  (it has the ``moe_local_output.json`` marker or a ``moe_local.json`` manifest) or is empty;
- a work folder (``OUT.partial``) is removed only when it carries the marker too.

Each output gets the marker the moment its work folder is made, so an interrupted run's folder
is recognisably ours and the finished folder carries it along when it is renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from moe_local.errors import MoeLocalError
from moe_local.format.manifest import MANIFEST

MARKER = "moe_local_output.json"


def is_ours(folder: Path) -> bool:
    """True when ``folder`` is a folder moe-local wrote (marker or manifest), not a link."""
    return (
        folder.is_dir()
        and not folder.is_symlink()
        and ((folder / MARKER).is_file() or (folder / MANIFEST).is_file())
    )


def _is_empty(folder: Path) -> bool:
    try:
        return folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())
    except OSError:
        return False


def check_not_source(
    out: Path, sources: Iterable[Path], what: str = "OUT", *, inside_ok: bool = False
) -> None:
    """Refuse an ``out`` that is, contains or (unless ``inside_ok``) lies inside one of ``sources``.

    Raises:
        MoeLocalError: naming the source it collides with.
    """
    target = Path(os.path.realpath(out))
    for src in sources:
        real = Path(os.path.realpath(src))
        if target == real:
            raise MoeLocalError(f"{what} {out} is the source {src} itself; choose a new folder")
        if real.is_relative_to(target):
            raise MoeLocalError(f"{what} {out} contains the source {src}; choose a folder outside it")
        if target.is_relative_to(real) and not inside_ok:
            raise MoeLocalError(f"{what} {out} lies inside the source {src}; choose a folder outside it")


def check_output(
    out: Path, sources: Iterable[Path] = (), *, overwrite: bool, what: str = "OUT", inside_ok: bool = False
) -> None:
    """Check that writing ``out`` cannot lose anything that moe-local did not write.

    Args:
        out: the folder a command is about to create or replace.
        sources: folders it reads from (never to be overwritten or written into).
        overwrite: the user passed ``--overwrite``.
        what: how messages name ``out`` (e.g. "OUT", "--offload-dir").
        inside_ok: ``out`` may lie inside a source (one that is only read, such as synth's config).

    Raises:
        MoeLocalError: one line saying why ``out`` cannot be written.
    """
    try:
        _check_output(out, sources, overwrite, what, inside_ok)
    except OSError as exc:  # a name too long, a folder we may not look into
        raise MoeLocalError(f"cannot use {what} {out}: {exc.strerror}") from exc


def _check_output(out: Path, sources: Iterable[Path], overwrite: bool, what: str, inside_ok: bool) -> None:
    check_not_source(out, sources, what, inside_ok=inside_ok)
    if out.is_symlink():
        raise MoeLocalError(f"{what} {out} is a symbolic link; give the folder itself")
    if not out.exists():
        return
    if not out.is_dir():
        raise MoeLocalError(f"{what} {out} is a file, not a folder")
    if not overwrite:
        raise MoeLocalError(f"{out} exists; pass --overwrite to replace it")
    if not is_ours(out) and not _is_empty(out):
        raise MoeLocalError(
            f"{out} is not a moe-local output (no {MARKER} or {MANIFEST}); --overwrite only replaces "
            "folders moe-local wrote or empty ones: choose another OUT or empty it yourself"
        )


def clear_partial(partial: Path) -> None:
    """Remove an earlier run's work folder ``partial`` if moe-local made it; refuse otherwise.

    Raises:
        MoeLocalError: ``partial`` exists and is not moe-local's.
    """
    if not partial.exists() and not partial.is_symlink():
        return
    check_partial(partial)
    shutil.rmtree(partial)


def check_partial(partial: Path) -> None:
    """Refuse a work folder ``partial`` that exists and is not moe-local's (it would be removed).

    Raises:
        MoeLocalError: naming the folder.
    """
    if (partial.exists() or partial.is_symlink()) and not is_ours(partial) and not _is_empty(partial):
        raise MoeLocalError(
            f"{partial} exists and is not a moe-local work folder; move it away (moe-local writes there)"
        )


def make_partial(partial: Path, kind: str) -> None:
    """Create the work folder ``partial`` and mark it as moe-local's at once.

    Raises:
        OSError: it cannot be created (callers turn this into a one-line error).
    """
    partial.mkdir(parents=True, exist_ok=True)
    write_marker(partial, kind)


def write_marker(folder: Path, kind: str) -> None:
    """Write the marker that says moe-local made ``folder`` (and what kind of output it is)."""
    from moe_local._version import __version__

    record = {"written_by": f"moe-local {__version__}", "kind": kind, "created": int(time.time())}
    (folder / MARKER).write_text(json.dumps(record) + "\n")


def publish(partial: Path, out: Path) -> None:
    """Move the finished ``partial`` onto ``out``, replacing an earlier output of ours.

    The earlier output is renamed aside before the new one takes its place and only then
    deleted, so at every moment ``out`` is either the old whole folder or the new whole folder.

    Raises:
        MoeLocalError: ``out`` appeared meanwhile and is not moe-local's.
        OSError: a rename failed.
    """
    old = None
    if out.exists() or out.is_symlink():
        if not is_ours(out) and not _is_empty(out):
            raise MoeLocalError(f"{out} is not a moe-local output; not replacing it")
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        out.rename(old)
    partial.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def os_error_line(path: Path, exc: OSError) -> str:
    """One line for an OSError met while writing under ``path``."""
    import errno

    if exc.errno == errno.ENOSPC:
        return f"no space left on the disk of {path}; free some and run again"
    return f"cannot write {path}: {exc.strerror or exc}"


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with its write errors as ``OSError`` (ENOSPC when the disk fills).

    safetensors reports a failed write as ``SafetensorError`` carrying the OS error's text;
    turning it back into an OSError lets every writer report it in one line.
    """
    import errno

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        text = str(exc)
        code = errno.ENOSPC if ("No space left" in text or "StorageFull" in text) else errno.EIO
        if "File too large" in text or "FileTooLarge" in text:
            code = errno.EFBIG
        raise OSError(code, os.strerror(code), str(path)) from exc


def check_output_file(path: str | Path, flag: str) -> None:
    """Check, before any long work, that a file can be created at ``path`` (by creating and removing one).

    Raises:
        MoeLocalError: ``path`` is a folder, or its folder is missing or not writable.
    """
    import tempfile

    p = Path(path)
    if p.is_dir():
        raise MoeLocalError(f"{flag} {path} is a folder; give a file name")
    parent = p.parent
    if not parent.is_dir():
        raise MoeLocalError(f"{flag} {path}: the folder {parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".moe-local-check-"):
            pass
    except OSError as exc:
        raise MoeLocalError(f"{flag} {path}: cannot write in {parent} ({exc.strerror})") from exc
