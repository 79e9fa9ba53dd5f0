"""Linux facts the offload benchmark needs: page cache eviction and residency, I/O and CPU counters.

Everything here reads ``/proc`` or calls ``posix_fadvise``/``fsync``; nothing needs root.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def data_files(*roots: str | Path) -> list[Path]:
    """Every regular file under ``roots`` (a root may also be a file); missing roots are skipped."""
    out: list[Path] = []
    for root in roots:
        p = Path(root)
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
    return out


def evict(paths: Iterable[Path]) -> None:
    """Drop the files' clean pages from the page cache (``POSIX_FADV_DONTNEED`` on the whole file).

    Dirty pages are only queued for write-back by the kernel and stay; call ``fsync_files`` after
    writing a file so a later eviction really empties the cache. Pages a process has mapped stay too.
    """
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_files(paths: Iterable[Path]) -> None:
    """Write every file's dirty pages to disk, so that eviction afterwards drops them."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def cached_bytes(paths: Iterable[Path]) -> int | None:
    """Bytes of the files now in the page cache (util-linux ``fincore``); None when it is missing."""
    paths = [str(p) for p in paths]
    if not paths or shutil.which("fincore") is None:
        return None
    res = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", *paths],
        capture_output=True,
        text=True,
        check=False,
    )
    return sum(int(x) for x in res.stdout.split() if x.isdigit())


def read_bytes() -> int:
    """Bytes this process (all its threads) caused to be fetched from the storage layer so far."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise OSError("/proc/self/io has no read_bytes")


def rss_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB: resident now and peak since start or ``reset_peak_rss``."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                vals[key] = int(rest.split()[0])
    return vals["VmRSS"], vals["VmHWM"]


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (``/proc/self/clear_refs`` value 5), if the kernel allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def machine_busy_seconds() -> float:
    """CPU-seconds all cores spent busy since boot (``/proc/stat``, idle and iowait excluded)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    busy = vals[0] + vals[1] + vals[2] + vals[5] + vals[6] + (vals[7] if len(vals) > 7 else 0)
    return busy / _TICK


def own_cpu_seconds() -> float:
    """CPU-seconds this process (all threads) has used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Contention:
    """Measures how many cores other processes used over an interval (this process excluded)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0 = machine_busy_seconds()
        self.own0 = own_cpu_seconds()

    def others(self) -> float:
        """Average cores other processes kept busy since construction."""
        wall = max(time.perf_counter() - self.t0, 1e-9)
        busy = machine_busy_seconds() - self.busy0
        own = own_cpu_seconds() - self.own0
        return max(0.0, (busy - own) / wall)


def wait_quiet(max_wait: float, threshold: float = 0.3, window: float = 2.0) -> float:
    """Wait (at most ``max_wait`` s) until other processes use under ``threshold`` cores for ``window`` s.

    Returns:
        The cores busy in the last window seen (the caller records it).
    """
    deadline = time.monotonic() + max_wait
    busy = 0.0
    while True:
        b0, t0 = machine_busy_seconds(), time.perf_counter()
        time.sleep(window)
        busy = (machine_busy_seconds() - b0) / (time.perf_counter() - t0)
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def machine_info(disk_path: str | Path) -> dict:
    """CPU model, cores, RAM, the disk behind ``disk_path``, kernel, Python, torch and library versions."""
    import torch
    import transformers

    info: dict[str, object] = {"date": time.strftime("%Y-%m-%d %H:%M %Z")}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    info["cores"] = os.cpu_count()
    with open("/proc/meminfo") as f:
        info["ram_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    info["kernel"] = platform.release()
    info["python"] = platform.python_version()
    info["torch"] = torch.__version__
    info["transformers"] = transformers.__version__
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
    except ImportError:
        info["accelerate"] = "missing"
    info["disk"] = _disk_of(Path(disk_path))
    return info


def _disk_of(path: Path) -> str:
    """The block device, filesystem and (when sysfs tells) rotational flag and model of ``path``."""
    res = subprocess.run(
        ["df", "--output=source,fstype,size", str(path)], capture_output=True, text=True, check=False
    )
    lines = res.stdout.split("\n")
    if len(lines) < 2:
        return "unknown"
    source, fstype, size = [*lines[1].split(), "?", "?", "?"][:3]
    dev = Path(source).name
    extra = []
    sysdev = Path("/sys/block") / dev
    if sysdev.exists():
        for name, label in (("queue/rotational", "rotational"), ("device/model", "model")):
            f = sysdev / name
            if f.exists():
                extra.append(f"{label}={f.read_text().strip()}")
    return f"{source} ({fstype}, {size} 1K-blocks{', ' + ', '.join(extra) if extra else ''})"
