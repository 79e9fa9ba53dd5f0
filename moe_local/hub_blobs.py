"""Fetch a model's files into the Hugging Face cache so that an interrupted pull resumes mid-file.

huggingface_hub (1.x-2.x) downloads each file into a temporary ``<etag>.<random>.incomplete`` blob
and deletes it when the run fails; only within one run does it resume a dropped connection with
an HTTP Range request. With ``hf_xet`` installed a Xet-backed file goes through Xet's own
transfer, which also writes a fresh temporary file; ``HF_HUB_ENABLE_HF_TRANSFER`` is ignored in
2.x. So a pull that stops in a 5 GB shard, whatever the cause (Ctrl-C, a dead network, a reboot),
would fetch that shard again from its first byte.

``fetch_blobs`` therefore downloads every file itself, over plain HTTP, into the cache's own
layout: ``blobs/<etag>.incomplete`` (a name huggingface_hub never uses) kept across runs, resumed
with ``Range: bytes=N-`` (a server that ignores the range sends the whole file, which then
replaces the partial one), its size and checksum (the etag: SHA-256 for LFS files, the git blob
SHA-1 for others) checked before it is moved to ``blobs/<etag>``. huggingface_hub then only links
the snapshot to the blobs. It takes huggingface_hub's lock of that blob meanwhile, so two pulls of
one model do not write one file together.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from moe_local.errors import MoeLocalError

_HEX_ID = re.compile(r"[0-9a-f]{64}|[0-9a-f]{40}")  # an LFS file's SHA-256, a git blob's SHA-1

PARTIAL = ".incomplete"
WORKERS = 4  # files fetched at once (shards download faster side by side)
_HASH_BLOCK = 1 << 20


def fetch_blobs(
    repo_id: str,
    commit: str,
    filenames: Iterable[str],
    *,
    storage: Path,
    endpoint: str | None = None,
) -> None:
    """Download the blobs of ``filenames`` at ``commit`` into ``storage`` (a repo's cache folder).

    Each file is linked into the snapshot as soon as its blob is complete, so a later failure
    keeps it.

    Raises:
        MoeLocalError: a file whose bytes do not match the hub's checksum.
        huggingface_hub's HTTP errors, and OSError, for the caller to word.
    """
    names = list(filenames)
    if not names:
        return
    with ThreadPoolExecutor(
        max_workers=min(WORKERS, len(names)), thread_name_prefix="moe-local-blob"
    ) as pool:
        for future in [pool.submit(_fetch, repo_id, commit, n, storage, endpoint) for n in names]:
            future.result()


def partial_bytes(blobs: Path) -> int:
    """Bytes already in the partial blobs of ``blobs`` (what a resumed pull need not fetch again)."""
    try:
        return sum(p.stat().st_size for p in blobs.glob(f"*{PARTIAL}") if p.is_file())
    except OSError:
        return 0


def _fetch(repo_id: str, commit: str, filename: str, storage: Path, endpoint: str | None) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url, http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    url = hf_hub_url(repo_id, filename, revision=commit, endpoint=endpoint)
    meta = get_hf_file_metadata(url, endpoint=endpoint)
    if not meta.etag:
        raise MoeLocalError(f"the hub sends no checksum (ETag) for {filename}; cannot verify it")
    if not _HEX_ID.fullmatch(meta.etag):  # it names a file in the cache: nothing but the hub's ids
        raise MoeLocalError(f"the hub's ETag for {filename} is not a SHA-256 or git id; not fetched")
    blob = storage / "blobs" / meta.etag
    # the file's own bytes, so that a range counts in them (a compressed answer cannot be resumed)
    headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
    source = url
    if meta.xet_file_data is None and meta.location and meta.location != url:
        source = meta.location  # the CDN's signed address: it takes no hub token
        if urlparse(source).netloc != urlparse(url).netloc:
            headers.pop("authorization", None)
    lock = storage.parent / ".locks" / storage.name / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if not blob.exists():
            _resume(source, headers, blob, meta.size, meta.etag, filename, http_get)
    # links the snapshot's file to the blob (no download: the blob is there)
    hf_hub_download(repo_id, filename, revision=commit, cache_dir=storage.parent, endpoint=endpoint)


def _resume(
    source: str, headers: dict, blob: Path, size: int | None, etag: str, filename: str, http_get
) -> None:
    """Bring ``blob``'s partial file to its end with Range requests, check it, move it into place."""
    partial = blob.with_name(blob.name + PARTIAL)
    blob.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if size is not None and have > size:  # not this file's beginning: start over
        have = 0
        partial.unlink()
    with partial.open("ab") as out:
        http_get(
            source, out, resume_size=have, headers=headers, expected_size=size, displayed_filename=filename
        )
    if not _matches(partial, etag):
        partial.unlink()
        raise MoeLocalError(
            f"{filename} came down different from the hub's copy (checksum); run moe-local pull again"
        )
    os.chmod(partial, 0o644)
    partial.replace(blob)


def _matches(path: Path, etag: str) -> bool:
    """Whether ``path`` has the content ``etag`` names (an etag of another form is not checked)."""
    etag = etag.lower()
    if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
        digest = hashlib.sha256()
    elif len(etag) == 40 and all(c in "0123456789abcdef" for c in etag):
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update(f"blob {path.stat().st_size}\0".encode())  # a git blob's id
    else:
        return True
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest() == etag
