"""The memory this process may really use, and what running a model costs beyond its weights.

A container or a systemd slice caps a process with its cgroup (v1 ``memory.limit_in_bytes``,
v2 ``memory.max``/``memory.high``), which is often far less than the machine's RAM that
``psutil`` reports; ``ulimit -v`` caps it with ``RLIMIT_AS``. Every sizing decision (the
planner's budget, bench's all-resident floor run, the check of ``--cpu-memory``) reads
``memory_limit`` and ``available_memory`` here instead of the host's numbers.

The runtime overhead is measured, not assumed: the memory this process holds now (the
interpreter, torch, transformers and whatever is loaded already; its anonymous pages and a working
set of the files it maps, the rest of which a cap reclaims) plus estimates, from the
config alone, of one prefill chunk's activations, and a fixed slack for the allocator and the
imports generation still makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
PROC_MOUNTINFO = Path("/proc/self/mountinfo")
PROC_STATUS = Path("/proc/self/status")
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as the page-rounded LONG_MAX
# Allocator slack and what generation still imports or builds after planning (the tokenizer,
# sampling, kernel layouts of dense weights): measured 7-10 MiB past the load with a 64-token
# prompt on a 0.5 GB checkpoint, about 40 MiB with 512-token prompts.
# What the runtime holds before any weight, at its smallest (``held_memory``): after `import torch,
# moe_local.loading.loader` 238 MiB are anonymous on the 2-core test VM (torch alone 143 MiB; the rest
# transformers and what it imports), plus the mapped files' working set; the model's classes and
# the planner's measurement add more later. A --cpu-memory below this cannot run anything: it is
# refused in one line before loading, instead of the cgroup's OOM killer ending the process.
MIN_PROCESS_MEMORY = 288 * 2**20
SLACK = 64 * 2**20
# Mapped code and data files the decode loop keeps touching: of the ~106 MiB of file pages resident
# after the imports most ran once (import-time initialisation); under a cap the kernel reclaims
# those and leaves the working set. Counted with margin (see ``held_memory``).
FILE_WORKING_SET = 48 * 2**20


@dataclass(frozen=True)
class CgroupMemory:
    """One cgroup on this process's path that limits memory.

    Attributes:
        path: the cgroup's directory.
        limit: bytes it may hold (the smaller of ``memory.max`` and ``memory.high`` on v2).
        usage: bytes charged to it now, page cache included.
        reclaimable: inactive file pages of that charge, which the kernel drops before it kills.
        swap: bytes of swap it may use beyond ``limit`` (None: not limited by the cgroup).
    """

    path: Path
    limit: int
    usage: int
    reclaimable: int
    swap: int | None

    @property
    def free(self) -> int:
        """Bytes it can still take without reclaiming more than its inactive page cache."""
        return max(0, self.limit - max(0, self.usage - self.reclaimable))


def _read_int(path: Path) -> int | None:
    """An integer file of cgroupfs; None for "max", a missing or unreadable file."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text.split()[0])
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _stat_field(path: Path, *names: str) -> int:
    """The first of ``names`` found in a ``memory.stat`` file (0 if none)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    fields = dict(line.split()[:2] for line in lines if len(line.split()) >= 2)
    for name in names:
        if name in fields and fields[name].isdigit():
            return int(fields[name])
    return 0


def _mounts() -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(v1 memory mounts, v2 mounts) as (mount point, cgroup root of the mount) pairs."""
    v1: list[tuple[Path, str]] = []
    v2: list[tuple[Path, str]] = []
    try:
        lines = PROC_MOUNTINFO.read_text().splitlines()
    except OSError:
        return v1, v2
    for line in lines:
        # ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        root, point = fields[3], Path(fields[4].replace("\\040", " "))
        if tail[0] == "cgroup2":
            v2.append((point, root))
        elif tail[0] == "cgroup" and len(tail) >= 3 and "memory" in tail[2].split(","):
            v1.append((point, root))
    return v1, v2


def _own_cgroups() -> tuple[str | None, str | None]:
    """This process's (v1 memory cgroup, v2 cgroup) paths from /proc/self/cgroup."""
    v1 = v2 = None
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and parts[0] == "0":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def _chain(point: Path, root: str, path: str) -> list[Path]:
    """The directories of ``path`` and its ancestors under a mount of cgroup ``root``, deepest first.

    Inside a container the mount's root is the container's own cgroup (``root`` says which),
    or the container sees ``/`` for its own cgroup: either way the walk stops at the mount point.
    """
    rel = path
    if root not in ("", "/") and (path == root or path.startswith(root.rstrip("/") + "/")):
        rel = path[len(root.rstrip("/")) :]
    parts = [p for p in rel.split("/") if p and p not in (".", "..")]
    dirs = [point.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def cgroup_limits() -> list[CgroupMemory]:
    """Every cgroup on this process's path (v1 memory controller and v2) that sets a memory limit.

    Returns:
        Deepest first; empty when nothing limits memory or cgroupfs is not readable.
    """
    own_v1, own_v2 = _own_cgroups()
    mounts_v1, mounts_v2 = _mounts()
    found: list[CgroupMemory] = []
    seen: set[Path] = set()
    for own, mounts, v2 in ((own_v1, mounts_v1, False), (own_v2, mounts_v2, True)):
        if own is None:
            continue
        for point, root in mounts:
            for d in _chain(point, root, own):
                if d in seen:
                    continue
                seen.add(d)
                cg = _read_v2(d) if v2 else _read_v1(d)
                if cg is not None:
                    found.append(cg)
    return found


def _read_v1(d: Path) -> CgroupMemory | None:
    limit = _read_int(d / "memory.limit_in_bytes")
    if limit is None:
        return None
    memsw = _read_int(d / "memory.memsw.limit_in_bytes")
    return CgroupMemory(
        d,
        limit,
        _read_int(d / "memory.usage_in_bytes") or 0,
        _stat_field(d / "memory.stat", "total_inactive_file", "inactive_file"),
        None if memsw is None else max(0, memsw - limit),
    )


def _read_v2(d: Path) -> CgroupMemory | None:
    limits = [v for v in (_read_int(d / "memory.max"), _read_int(d / "memory.high")) if v is not None]
    if not limits:
        return None
    return CgroupMemory(
        d,
        min(limits),
        _read_int(d / "memory.current") or 0,
        _stat_field(d / "memory.stat", "inactive_file"),
        _read_int(d / "memory.swap.max"),
    )


def _address_space_limit() -> int | None:
    """The soft ``RLIMIT_AS`` (``ulimit -v``) in bytes, or None."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft in (resource.RLIM_INFINITY, -1) or soft < 0 else int(soft)


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, VmSize) in bytes."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def limits() -> dict[str, int]:
    """Every ceiling on this process's memory, by what sets it.

    Returns:
        ``{"RAM": physical RAM}`` and, where they apply, ``"cgroup memory limit"`` (the smallest
        on this process's path) and ``"RLIMIT_AS"`` (address space: resident memory stays below it).
    """
    import psutil

    out = {"RAM": int(psutil.virtual_memory().total)}
    cgroups = cgroup_limits()
    if cgroups:
        out["cgroup memory limit"] = min(cg.limit for cg in cgroups)
    address = _address_space_limit()
    if address is not None:
        out["RLIMIT_AS"] = address
    return out


def memory_limit() -> int:
    """Bytes this process may hold at most: the smallest of its cgroup limits, RLIMIT_AS and RAM."""
    return min(limits().values())


def limiting_factor() -> str:
    """What sets ``memory_limit``: ``"RAM"``, ``"cgroup memory limit"`` or ``"RLIMIT_AS"``."""
    found = limits()
    return min(found, key=lambda k: (found[k], k != "RAM"))


def swap_limit() -> int:
    """Bytes of swap this process may use: the host's swap, capped by its cgroups' swap limits."""
    import psutil

    swap = int(psutil.swap_memory().total)
    for cg in cgroup_limits():
        if cg.swap is not None:
            swap = min(swap, cg.swap)
    return swap


def available_memory() -> int:
    """Bytes this process can still take now without reclaiming more than inactive page cache.

    The host's available memory, and when a cgroup limits this process each limit minus what
    the cgroup holds (its inactive page cache counted as free, as the kernel reclaims it first),
    and with RLIMIT_AS the address space left: the smallest of them.
    """
    import psutil

    room = [int(psutil.virtual_memory().available)]
    room += [cg.free for cg in cgroup_limits()]
    address = _address_space_limit()
    if address is not None:
        room.append(max(0, address - (_status_bytes("VmSize") or 0)))
    return min(room)


def process_rss() -> int:
    """This process's resident memory now, in bytes."""
    rss = _status_bytes("VmRSS")
    if rss is not None:
        return rss
    import psutil

    return int(psutil.Process().memory_info().rss)


def held_memory() -> int:
    """Resident bytes this process cannot hand back under a memory limit, in bytes.

    Anonymous and shared-memory pages stay (there is no swap to push them to); of the file pages
    it maps (the code of Python, torch and the kernels) the kernel reclaims all but those in use
    and reads them back on demand, so only a working set of ``FILE_WORKING_SET`` is counted. Where
    /proc does not split the resident set, all of it (``process_rss``).
    """
    anon, shmem, files = (_status_bytes(f) for f in ("RssAnon", "RssShmem", "RssFile"))
    if anon is None or files is None:
        return process_rss()
    return anon + (shmem or 0) + min(files, FILE_WORKING_SET)


def peak_rss() -> int:
    """This process's peak resident memory so far (VmHWM), in bytes."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import psutil

    return int(psutil.Process().memory_info().rss)


@dataclass(frozen=True)
class Overhead:
    """What running a model costs in RAM beyond its weights and KV cache.

    Attributes:
        baseline: the memory this process holds when measured (``held_memory``: the
            interpreter, torch, transformers, the model's modeling code, anything loaded already).
        activations: one prefill chunk's hidden states, attention scores and expert
            intermediates (estimated from the config).
        slack: allocator slack and the imports generation still makes.
    """

    baseline: int
    activations: int
    slack: int = SLACK

    @property
    def total(self) -> int:
        """Bytes of all three."""
        return self.baseline + self.activations + self.slack


def activation_bytes(config, context: int, dtype_bytes: int) -> int:
    """Peak activation bytes of one forward pass over a prefill chunk, from the config alone.

    Args:
        config: the transformers config (its text config is used).
        context: tokens of context (a chunk attends to at most this many).
        dtype_bytes: bytes per element of the compute dtype.

    Returns:
        Bytes: the residual stream and its norm, q/k/v/o, the widest MLP intermediate (gate
        and up together), the attention scores where attention is eager (sdpa on CPU never
        materializes them: measured 18 MiB for 32 heads x 512 x 4096), and the logits.
    """
    text = getattr(config, "get_text_config", lambda: config)()
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or (hidden // heads if heads else 0))
    if getattr(text, "kv_lora_rank", None):  # MLA: queries and keys of nope + rope, values of v_head_dim
        head_dim = int(text.qk_nope_head_dim) + int(text.qk_rope_head_dim)
        kv_heads = heads
    widths = [int(getattr(text, n, 0) or 0) for n in ("intermediate_size", "moe_intermediate_size")]
    from moe_local.generation import PREFILL_CHUNK  # prompt tokens per forward pass

    tokens = max(1, min(context, PREFILL_CHUNK))
    per_token = 6 * hidden + 2 * (heads + 2 * kv_heads) * head_dim + 3 * max(widths, default=0)
    scores = 0
    if getattr(text, "_attn_implementation", None) == "eager":  # sdpa's CPU kernel tiles them away
        scores = heads * tokens * context * (dtype_bytes + 4)  # the scores, and their float softmax
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    return tokens * per_token * dtype_bytes + scores + 2 * vocab * 4  # + one position's float logits


def runtime_overhead(
    config=None, *, context: int = 4096, dtype_bytes: int = 4, baseline: int | None = None
) -> Overhead:
    """Measure the runtime overhead of running a model with ``config`` in this process.

    Nothing is loaded: the baseline is this process's resident memory now (call it after the
    model's config has been read, so its modeling code is imported), the rest comes from the
    config.

    Args:
        config: the transformers config (None: the baseline and slack only).
        context: tokens of context the KV cache and attention hold.
        dtype_bytes: bytes per element of the compute dtype.
        baseline: resident bytes to use instead of measuring (tests, another process).

    Returns:
        The overhead, in parts.
    """
    if baseline is None:
        import torch  # noqa: F401  (counted: a load imports them anyway)
        import transformers  # noqa: F401

        baseline = held_memory()
    act = activation_bytes(config, context, dtype_bytes) if config is not None else 0
    if config is not None and dtype_bytes == 2 and _bf16_gemm():
        act += BF16_GEMM_WORKSPACE
    return Overhead(baseline=baseline, activations=act)


# What torch's bf16 GEMM (oneDNN) keeps after the first prompt, where many rows run in it
# (``moe_local.quant.native.BF16_GEMM``): +94 MiB of resident memory after a 512-token prefill of the
# 8-layer benchmark model, +55 MiB for fifty 512 x 1024 x 4096 products; counted with margin.
BF16_GEMM_WORKSPACE = 128 << 20


def _bf16_gemm() -> bool:
    from moe_local.quant import native

    return native.BF16_GEMM
