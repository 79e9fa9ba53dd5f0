"""``--offload-dir``: stage a model's experts once on a fast disk as one-read blobs.

A Hugging Face checkpoint stores an expert as several tensors, often in several shards, on
whatever disk it was downloaded to. Staging rewrites it once into a moe-local folder under the
offload directory (an NVMe, say): each expert one 4096-aligned, checksummed blob in the
checkpoint's own dtype (nothing is quantized), the dense part in safetensors. A moe-local folder
is copied as it is. Later loads find the staged copy by the source's path, file sizes and times.

Staging never changes numerics: a rewritten copy's manifest carries a ``staged`` entry (an
unquantized source, and its dtype), so a load with dtype "auto" computes in what the source
would (``is_staged_copy``), not in the bfloat16 quantized folders get on the CPU.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

from moe_local.convert.outdir import check_not_source, clear_partial, os_error_line, publish, write_marker
from moe_local.errors import MoeLocalError
from moe_local.format.manifest import MANIFEST, read_manifest

Progress = Callable[..., None]


def staged_path(src: Path, offload_dir: Path) -> Path:
    """Where ``src``'s staged copy lives in ``offload_dir`` (whether or not it exists yet).

    Args:
        src: the model folder.
        offload_dir: the offload directory.

    Returns:
        ``offload_dir / NAME-DIGEST``; the digest changes when any source file changes.
    """
    digest = hashlib.sha256(str(src.resolve()).encode())
    for f in sorted(src.rglob("*")):
        if f.is_file() and (f.suffix in (".safetensors", ".json", ".bin")):
            st = f.stat()
            digest.update(f"{f.relative_to(src)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return Path(offload_dir) / f"{src.name}-{digest.hexdigest()[:12]}"


def prepare(
    model: str | Path,
    offload_dir: str | Path | None,
    *,
    download: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Resolve MODEL and, with an offload directory, stage its experts there first.

    The step a command runs before ``moe_local.loading.loader.load`` when the user gave
    ``--offload-dir`` (loading itself never writes anything).

    Args:
        model: a checkpoint folder or a cached hub id.
        offload_dir: the offload directory, or None to use the model where it is.
        download: allow fetching a hub id that is not cached.
        progress: called as ``progress(stage, done, total[, nbytes])`` while staging.

    Returns:
        The folder to load: the model's own, or its staged copy.

    Raises:
        MoeLocalError: the model cannot be found, its config is bad, or staging fails.
    """
    from moe_local.loading.checkpoint import load_config
    from moe_local.loading.resolve import resolve_model_path

    path = resolve_model_path(model, download=download)
    if offload_dir is None:
        return path
    load_config(path)  # refuse a bad config before staging gigabytes
    return stage_experts(path, offload_dir, progress)


def stage_experts(src: Path, offload_dir: str | Path, progress: Progress | None = None) -> Path:
    """Return a moe-local copy of ``src`` in ``offload_dir``, writing it the first time.

    Args:
        src: a Hugging Face or moe-local model folder.
        offload_dir: a folder on a fast disk (created if needed).
        progress: called as ``progress(stage, done, total[, nbytes])`` while staging.

    Returns:
        The staged folder, loadable as a moe-local model.

    Raises:
        MoeLocalError: the folder cannot be created or written, or ``src`` is a GPTQ checkpoint.
    """
    from moe_local.format.gptq_layout import is_gptq_checkpoint

    offload_dir = Path(offload_dir).expanduser()
    target = staged_path(src, offload_dir)
    check_not_source(target, [src], "--offload-dir")  # never written into the model it stages
    try:
        offload_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoeLocalError(f"cannot use --offload-dir {offload_dir}: {exc.strerror}") from exc
    if (target / MANIFEST).is_file() and ((src / MANIFEST).is_file() or is_staged_copy(target)):
        return target  # (a rewrite from before staged copies recorded their source is redone)
    if is_gptq_checkpoint(src):
        raise MoeLocalError("--offload-dir does not stage GPTQ checkpoints; quantize the source instead")
    try:
        if (src / MANIFEST).is_file():
            _copy_folder(src, target)
        else:
            _rewrite_as_blobs(src, target, progress)
    except OSError as exc:
        raise MoeLocalError(f"cannot stage experts: {os_error_line(offload_dir, exc)}") from exc
    return target


def is_staged_copy(folder: Path) -> bool:
    """True when ``folder`` is a staged copy of an unquantized checkpoint (it computes as one).

    Args:
        folder: a moe-local folder.

    Returns:
        Whether its manifest has the ``staged`` entry ``stage_experts`` writes.
    """
    try:
        staged = read_manifest(folder).get("staged")
    except MoeLocalError:
        return False
    return isinstance(staged, dict) and staged.get("source") == "unquantized"


def _copy_folder(src: Path, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    clear_partial(partial)
    shutil.copytree(src, partial, symlinks=True)  # links stay links: the reader refuses outside ones
    write_marker(partial, "staged")
    publish(partial, target)  # the manifest appears only with the whole folder


def _rewrite_as_blobs(src: Path, target: Path, progress: Progress | None) -> None:
    from moe_local.convert.writer import quantize_checkpoint
    from moe_local.recipes import Recipe, Rule

    keep_all = Recipe("keep", "every tensor as it is", (Rule("*", None, 0),))
    quantize_checkpoint(src, target, keep_all, overwrite=True, progress=progress, staged=True)
