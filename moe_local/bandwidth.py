"""Measured bandwidths the planner predicts speed from: cold disk reads and memory copies.

Measured once per machine and folder's file system, then cached in ``MOE_LOCAL_HOME``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moe_local import env

_SAMPLE = 256 * 2**20  # bytes read from disk for the measurement
_COPY = 128 * 2**20


@dataclass(frozen=True)
class Bandwidths:
    """Bytes per second of the paths an expert takes."""

    disk: float  # cold reads from the model's file system
    ram: float  # memory-to-memory copy (CPU compute is bound by it at decode)
    host_to_device: float | None = None  # pinned host -> GPU, when a GPU is present


def _cache_file() -> Path:
    return env.home_dir() / "bandwidth.json"


def _cold_read(folder: Path) -> float:
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    budget, done, t = _SAMPLE, 0, 0.0
    buf = bytearray(8 * 2**20)
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # make the read cold
            t0 = time.perf_counter()
            while done < budget:
                n = os.readv(fd, [buf])
                if n <= 0:
                    break
                done += n
            t += time.perf_counter() - t0
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if done >= budget:
            break
    return done / t if t > 0 and done > 0 else 1e9


def _ram_copy() -> float:
    from moe_local.memory import available_memory

    # two buffers: under a memory cap the measurement must not be what kills the process
    size = max(16 * 2**20, min(_COPY, available_memory() // 8))
    src = torch.empty(size, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return size / best


def _host_to_device() -> float | None:
    if not torch.cuda.is_available():
        return None
    src = torch.empty(_COPY, dtype=torch.uint8).pin_memory()
    dst = torch.empty(_COPY, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * _COPY / (time.perf_counter() - t0)


def measure_bandwidths(folder: Path, *, refresh: bool = False) -> Bandwidths:
    """Return this machine's bandwidths for ``folder``'s file system, measuring them the first time.

    Args:
        folder: a model folder (its largest files are read cold).
        refresh: measure again even when cached.

    Returns:
        The bandwidths.
    """
    key = str(os.stat(folder).st_dev)
    cache = _cache_file()
    data: dict = {}
    if cache.exists():
        try:
            data = json.loads(cache.read_text())
        except json.JSONDecodeError:
            data = {}
    if not refresh and key in data:
        return Bandwidths(**data[key])
    bw = Bandwidths(disk=_cold_read(folder), ram=_ram_copy(), host_to_device=_host_to_device())
    data[key] = asdict(bw)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(data, indent=1))
    except OSError:  # a read-only home still gets a plan, just measured each time
        pass
    return bw
