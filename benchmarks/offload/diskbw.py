"""Cold-read bandwidth of the disk under the checkpoint, read the way an expert cache reads it.

Expert-sized ranges at random offsets of the given files, after dropping the files from the page
cache; one ``preadv`` per range, as moe-local does. ``buffered`` goes through the page cache (and
drops each range afterwards); ``direct`` uses ``O_DIRECT`` into an aligned buffer.
"""

from __future__ import annotations

import mmap
import os
import random
import time
from pathlib import Path

from offload.sysio import evict, read_bytes


def cold_read_bandwidth(
    files: list[Path], chunk: int, total: int, *, direct: bool = False, seed: int = 0
) -> dict:
    """Read about ``total`` bytes in ``chunk``-byte ranges at random page-aligned offsets of ``files``.

    Args:
        files: files to read (big ones: the checkpoint shards).
        chunk: bytes per read (one expert).
        total: bytes to read in all.
        direct: open with ``O_DIRECT`` (bypass the page cache) instead of buffered reads.
        seed: picks the offsets.

    Returns:
        ``{"gbps": GB/s (1e9 bytes), "bytes": bytes read, "seconds": ..., "disk_bytes": /proc/self/io}``.
    """
    rng = random.Random(seed)
    sizes = {f: f.stat().st_size for f in files}
    ranges = []
    for _ in range(max(1, total // chunk)):
        f = rng.choice([f for f in files if sizes[f] > 2 * chunk])
        off = rng.randrange(0, sizes[f] - chunk) // 4096 * 4096
        ranges.append((f, off))
    evict(files)
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = {f: os.open(f, flags) for f in files}
    rb0 = read_bytes()
    t0 = time.perf_counter()
    n = 0
    try:
        for f, off in ranges:
            n += os.preadv(fds[f], [buf], off)
            if not direct:
                os.posix_fadvise(fds[f], off, chunk, os.POSIX_FADV_DONTNEED)
    finally:
        for fd in fds.values():
            os.close(fd)
    seconds = time.perf_counter() - t0
    return {"gbps": n / seconds / 1e9, "bytes": n, "seconds": seconds, "disk_bytes": read_bytes() - rb0}
