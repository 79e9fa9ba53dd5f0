"""A cgroup v1 memory limit around one child process, page cache charged; and dropping caches.

Linux charges a cgroup v1 memory group for the page cache its processes fault in, so a limit
there bounds mmap'd weights (llama.cpp) as well as anonymous memory (moe-local's expert cache).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/memory")


def cgroup_problem() -> str | None:
    """None when a memory cgroup can be made and limited here, else why not (one line)."""
    if not (ROOT / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {ROOT}"
    probe = ROOT / f"moe-bench-probe-{os.getpid()}"
    try:
        probe.mkdir()
        (probe / "memory.limit_in_bytes").write_text(str(256 * 2**20))
    except OSError as e:
        return f"cannot create a memory cgroup under {ROOT}: {e.strerror}"
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
    return None


def drop_page_cache() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False when not permitted."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class CgroupStats:
    """What the kernel counted for one capped run."""

    limit: int
    max_usage: int
    failcnt: int  # times usage hit the limit (reclaim, not necessarily an OOM kill)
    oom_kills: int  # processes the cgroup's OOM killer ended (-1: the kernel does not say)


class MemoryCgroup:
    """A fresh memory cgroup with a limit; ``preexec`` moves a child into it before its exec."""

    def __init__(self, name: str, limit: int) -> None:
        self.path = ROOT / f"{name}-{os.getpid()}"
        self.limit = limit
        if self.path.exists():
            self.path.rmdir()
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def preexec(self) -> None:
        """Run in the forked child: join the cgroup, so the exec'd program and its children are charged."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def stats(self) -> CgroupStats:
        """The limit, peak usage, limit hits and OOM kills so far."""
        oom = -1
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                oom = int(value)
        return CgroupStats(
            limit=self.limit,
            max_usage=int((self.path / "memory.max_usage_in_bytes").read_text()),
            failcnt=int((self.path / "memory.failcnt").read_text()),
            oom_kills=oom,
        )

    def close(self) -> None:
        """Remove the cgroup (its remaining page cache charges move to the parent)."""
        with contextlib.suppress(OSError):
            self.path.rmdir()
