"""Cold expert reads: O_DIRECT against buffered reads whose pages are dropped after.

The ranges are a checkpoint's own experts (a moe-local folder's blobs, or the tensors of a Hugging
Face checkpoint that are 1 MiB or larger), read in a random order with
``moe_local.format.direct_read.read_range``, each mode a round in turn, the file's pages dropped
before each round (``posix_fadvise``), medians over rounds:

    python benchmarks/bench_direct_read.py ~/.cache/moe-local-bench/checkpoints/bf16 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

MIB = 1 << 20


def expert_ranges(folder: Path) -> list[tuple[Path, int, int]]:
    """(file, offset, bytes) of every expert blob, or of every tensor of at least 1 MiB."""
    from moe_local.format.manifest import read_manifest
    from moe_local.format.safetensors_io import CheckpointFiles

    if (folder / "moe_local.json").exists() or (folder / "manifest.json").exists():
        manifest = read_manifest(folder)
        return [
            (folder / entry["file"], int(off), int(n))
            for entry in manifest["layers"].values()
            for off, n, _crc in entry["experts"]
        ]
    files = CheckpointFiles(folder)
    out = []
    for name in files.names():
        info = files.info(name)
        if info.nbytes >= MIB:
            out.append((files.key_to_file[name].path, info.offset, info.nbytes))
    return out


def drop(paths: set[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--mib", type=int, default=640, help="bytes read per round (default 640 MiB)")
    a = p.parse_args()
    from moe_local.format.direct_read import read_range, refused

    ranges = expert_ranges(a.folder.expanduser())
    paths = {r[0] for r in ranges}
    rng = random.Random(0)
    rates: dict[str, list[float]] = {"buffered": [], "direct": []}
    for rnd in range(a.rounds):
        order = list(rates) if rnd % 2 == 0 else list(rates)[::-1]
        for mode in order:
            picks, total = [], 0
            while total < a.mib * MIB:
                picks.append(rng.choice(ranges))
                total += picks[-1][2]
            drop(paths)
            t = time.perf_counter()
            for path, off, n in picks:
                read_range(path, off, n, direct=mode == "direct")
            rates[mode].append(total / (time.perf_counter() - t) / 1e9)
    sizes = sorted({n for _, _, n in ranges})
    print(f"{a.folder}: {len(ranges)} ranges of {sizes[0] / MIB:.1f}-{sizes[-1] / MIB:.1f} MiB")
    if any(refused(pth) for pth in paths):
        print("note: this filesystem refused O_DIRECT; 'direct' was read buffered")
    for mode, r in rates.items():
        print(f"{mode:9s} median {statistics.median(r):.2f} GB/s  runs {' '.join(f'{x:.2f}' for x in r)}")
    ratio = statistics.median(rates["direct"]) / statistics.median(rates["buffered"])
    print(f"direct / buffered: {ratio:.2f}x")


if __name__ == "__main__":
    main()
