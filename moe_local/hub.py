"""The Hugging Face hub: ``pull`` a checkpoint into the local cache, ``list_models`` on this machine.

``pull`` is the one place moe-local goes to the network, and only when asked. It fetches what a
model needs and nothing that runs code: safetensors weights, JSON configs, tokenizer files and
chat templates; never pickles (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``) nor Python files.
Files land in the Hugging Face cache (``HF_HOME``, ``HF_HUB_CACHE``; the hub is ``HF_ENDPOINT``),
where every moe-local command finds them by hub id. An interrupted pull resumes: the files already
complete stay in the cache and are not fetched again (weights come in shards of a few GB), and the
file it was fetching goes on from the bytes it had, with an HTTP Range request, both within a run
(a dropped connection) and in the next run (Ctrl-C, a dead network). huggingface_hub alone would
delete that partial file and start it over, so ``moe_local.hub_blobs`` fetches the files itself
into the cache's layout, checks each against the hub's checksum, and huggingface_hub links them.

``list_models`` lists the models in the hub cache and the moe-local folders under
``MOE_LOCAL_HOME`` (the demo), with family, size on disk and quantization.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moe_local.errors import MoeLocalError, first_line
from moe_local.hub_blobs import fetch_blobs, partial_bytes

# fnmatch patterns on repo paths ("*" also matches "/", so files in subfolders count too)
ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.json",
    "*.jinja",  # chat templates (rendered sandboxed by transformers)
    "tokenizer*",  # tokenizer.model, tokenizer.json, ...
    "*.model",  # SentencePiece models under other names (spiece.model)
    "*.tiktoken",
    "*.txt",  # merges.txt; also what resolving a hub id offline expects to be complete
    "vocab.*",
)
# never fetched even when an allow pattern matches (``vocab.py``): pickles and code
NEVER_PATTERNS: tuple[str, ...] = (
    "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.npy", "*.npz", "*.py", "*.pyc", "*.so",
)  # fmt: skip
_POLL_S = 0.25  # how often the bytes on disk are counted while a pull runs
Progress = Callable[[str, int, int, int], None]  # (stage, done bytes, total bytes, new bytes)


@dataclass(frozen=True)
class PullResult:
    """What a pull fetched.

    Attributes:
        repo_id: the hub id.
        commit: the commit the revision resolved to.
        path: the snapshot folder in the cache.
        files: files the model has (after the patterns).
        downloaded: files fetched by this pull (the rest were cached).
        nbytes: bytes of the files fetched by this pull.
    """

    repo_id: str
    commit: str
    path: Path
    files: int
    downloaded: int
    nbytes: int


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    progress: Progress | None = None,
) -> PullResult:
    """Download a model's safetensors, configs and tokenizer into the Hugging Face cache.

    Args:
        repo_id: e.g. ``mistralai/Mixtral-8x7B-v0.1``.
        revision: a branch, tag or commit (default: the repo's main branch).
        cache_dir: the hub cache (default: huggingface_hub's, from ``HF_HOME`` / ``HF_HUB_CACHE``).
        endpoint: the hub's URL (default: ``HF_ENDPOINT`` or huggingface.co).
        progress: called as ``progress("download", done_bytes, total_bytes, new_bytes)``.

    Returns:
        Where the files are, and what was fetched.

    Raises:
        MoeLocalError: a malformed id, a repo or revision the hub does not have, a gated repo, no
            safetensors weights or no config.json, or a network failure (one line).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise MoeLocalError(f"{repo_id!r} is not a hub id (owner/name): {first_line(exc)}") from exc
    if "/" not in repo_id:
        raise MoeLocalError(f"{repo_id!r} is not a hub id: write it as owner/name")
    kwargs = dict(
        revision=revision,
        cache_dir=cache_dir,
        endpoint=endpoint,
        allow_patterns=list(ALLOW_PATTERNS),
        ignore_patterns=list(NEVER_PATTERNS),
    )
    where = f"{repo_id}" + (f" at revision {revision}" if revision else "")
    with _hub_bars_off():
        plan = _hub_call(lambda: snapshot_download(repo_id, dry_run=True, **kwargs), where)
    names = {f.filename for f in plan}
    if not any(n.endswith(".safetensors") for n in names):
        raise MoeLocalError(
            f"{where} has no .safetensors weights; moe-local never downloads pickled weights (.bin, .pt)"
        )
    if "config.json" not in names:
        raise MoeLocalError(f"{where} has no config.json at its top: not a transformers model")
    todo = [f for f in plan if f.will_download]
    total = sum(f.file_size or 0 for f in todo)
    storage = _storage_folder(repo_id, cache_dir)
    commit = plan[0].commit_hash

    def fetch() -> str:
        fetch_blobs(repo_id, commit, [f.filename for f in todo], storage=storage, endpoint=endpoint)
        return snapshot_download(repo_id, **kwargs)  # links what is left, and writes the revision's ref

    with _hub_bars_off():
        path = Path(_download(fetch, where, storage / "blobs", total, progress))
    from moe_local.loading.resolve import resolve_model_path

    resolve_model_path(path)  # the folder is a model (config.json there): what every command will load
    return PullResult(repo_id, plan[0].commit_hash, path, len(plan), len(todo), total)


def _storage_folder(repo_id: str, cache_dir: str | Path | None) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    return root / repo_folder_name(repo_id=repo_id, repo_type="model")


def _disk_bytes(folder: Path) -> int:
    try:
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    except OSError:  # not created yet, or a file renamed while counted
        return 0


@contextlib.contextmanager
def _hub_bars_off() -> Iterator[None]:
    """huggingface_hub's own bars off: moe-local's progress (bars or lines) reports the pull."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _download(
    fetch: Callable[[], str], where: str, blobs: Path, total: int, progress: Progress | None
) -> str:
    """Run ``fetch`` in a thread and report the bytes landing in ``blobs`` (the cache's files).

    A daemon thread: Ctrl-C ends the process at once, and the partial file stays to be resumed.
    """
    result: list[str] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(_hub_call(fetch, where))
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    done = min(partial_bytes(blobs), total)  # a resumed file's bytes are done already
    start = _disk_bytes(blobs) - done
    if progress is not None and done:
        progress("download", done, total, done)
    worker = threading.Thread(target=run, name="moe-local-pull", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(_POLL_S)
        now = min(max(_disk_bytes(blobs) - start, 0), total)
        if progress is not None and now != done:
            progress("download", now, total, now - done)
        done = now
    if error:
        raise error[0]
    if progress is not None:  # files of no declared size are not counted as they come: end at the total
        progress("download", total, total, max(total - done, 0))
    return result[0]


def _hub_call(call: Callable, where: str):
    """Run a huggingface_hub call, its errors turned into one line each."""
    from huggingface_hub.errors import (
        DryRunError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return call()
    except (HfHubHTTPError, OSError, *_transport_errors()) as exc:
        root = exc
        if isinstance(exc, (DryRunError, LocalEntryNotFoundError)) and exc.__cause__ is not None:
            root = exc.__cause__  # the hub's answer (or the network error) behind "cannot access"
        repo = where.split(" ")[0]
        if isinstance(root, GatedRepoError):
            message = f"{where} is gated: accept its terms on the hub, then log in (hf auth login)"
        elif isinstance(root, RepositoryNotFoundError):
            message = f"no model {repo} on the hub (or it is private: hf auth login)"
        elif isinstance(root, RevisionNotFoundError):
            message = f"{where}: the hub has no such revision"
        elif root is not exc or isinstance(exc, LocalEntryNotFoundError):
            message = f"cannot reach the hub for {repo}: {first_line(root)}"
        else:
            message = f"cannot fetch {repo}: {first_line(exc)}"
        raise MoeLocalError(message) from exc


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's network errors (huggingface_hub 2.x uses httpx2, 1.x httpx)."""
    import importlib

    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


# ----------------------------------------------------------------------------- list


@dataclass(frozen=True)
class LocalModel:
    """A model on this machine.

    Attributes:
        name: the hub id (with ``@revision`` when not main), or the folder's name.
        where: "hub cache" or "moe-local".
        path: its folder.
        family: ``model_type`` from config.json ("?" when unreadable).
        nbytes: size on disk.
        quantization: "moe-local <recipe>", "gptq 4-bit", the dtype (unquantized), or "?".
    """

    name: str
    where: str
    path: Path
    family: str
    nbytes: int
    quantization: str


def list_models(*, cache_dir: str | Path | None = None, home: Path | None = None) -> list[LocalModel]:
    """The models in the hub cache and the moe-local folders under ``MOE_LOCAL_HOME``.

    Args:
        cache_dir: the hub cache (default: huggingface_hub's).
        home: the moe-local home (default: ``MOE_LOCAL_HOME``).

    Returns:
        Hub models first (one per cached revision that has a config.json), then moe-local folders,
        each group sorted by name.
    """
    from moe_local.env import home_dir

    models = _hub_models(cache_dir)
    root = home_dir() if home is None else home
    if root.is_dir():
        folders = sorted(
            {p.parent for p in root.glob("*/config.json")} | {p.parent for p in root.glob("*/*/config.json")}
        )
        for folder in folders:
            if not folder.name.endswith(".partial"):
                family, quant = _describe(folder)
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                models.append(LocalModel(folder.name, "moe-local", folder, family, size, quant))
    return models


def _hub_models(cache_dir: str | Path | None) -> list[LocalModel]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:  # nothing was ever downloaded
        return []
    models = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: sorted(r.refs)):
            if not (rev.snapshot_path / "config.json").exists():
                continue  # a tokenizer-only or dataset-like download
            refs = sorted(rev.refs)
            name = repo.repo_id if "main" in refs else f"{repo.repo_id}@{(refs or [rev.commit_hash[:8]])[0]}"
            family, quant = _describe(rev.snapshot_path)
            models.append(LocalModel(name, "hub cache", rev.snapshot_path, family, rev.size_on_disk, quant))
    return models


def _describe(folder: Path) -> tuple[str, str]:
    """``(family, quantization)`` of a model folder, from config.json and the moe-local manifest."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return "?", "?"
    if not isinstance(config, dict):
        return "?", "?"
    family = str(config.get("model_type") or "?")
    manifest = folder / "moe_local.json"
    if manifest.exists():
        try:
            recipe = json.loads(manifest.read_text()).get("recipe")
        except (OSError, ValueError, AttributeError):
            recipe = None
        return family, f"moe-local {recipe}" if recipe else "moe-local"
    q = config.get("quantization_config")
    if isinstance(q, dict):
        method = q.get("quant_method") or q.get("method") or "quantized"
        bits = q.get("bits") or q.get("w_bit")
        return family, f"{method} {bits}-bit" if bits else str(method)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    dtype = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return family, str(dtype) if dtype else "?"
