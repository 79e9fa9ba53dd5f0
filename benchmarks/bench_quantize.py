"""Benchmark ``moe-local quantize``: end-to-end runs on a synthetic Mixtral and matrix-level quantize.

Part a (end-to-end): ``python -m moe_local quantize SRC OUT --recipe R`` (the code behind the
``moe-local`` script) runs as a child process with ``MOE_LOCAL_THREADS``; before every run the
source shards' pages are evicted from the page cache (``posix_fadvise(DONTNEED)``, checked with
``fincore`` when present) and the previous output is removed. Measured: wall time, the writer's own
time (the CLI's "in X s"), throughput in MB/s of bf16 input (tensor bytes of the source / time),
and the child's peak RSS (``ru_maxrss`` from ``os.wait4``, cross-checked by polling VmRSS).

Part b (matrix level, in process): ``moe_local.quant.quantize`` at int4-g64 with rtn and hqq on a
[14336, 4096] bf16 matrix, given bf16 (as the writer passes it) and fp32 (``w.float()`` timed too),
and the ``hqq`` package's ``Quantizer.quantize`` (optimize=True, axis=1, on CPU) when it imports;
reconstruction error is ``||W - W_hat||_F / ||W||_F`` against the bf16 values.

The machine is shared: every measurement records how many cores other processes used meanwhile
(``/proc/stat`` busy time minus our own CPU time, divided by wall time), and ``--quiet-wait`` waits
for the machine to go idle before each run.

Usage::

    python benchmarks/bench_quantize.py                       # everything, results to stdout + JSON
    python benchmarks/bench_quantize.py --skip-e2e --runs 5   # matrix level only
    python benchmarks/bench_quantize.py --profile rtn         # cProfile of one in-process writer run
    python benchmarks/bench_quantize.py --spy rtn             # py-spy of one CLI run, summarized
    python benchmarks/bench_quantize.py --hqq-breakdown --matrix 4096 4096   # hqq's parts switched off
    python benchmarks/bench_quantize.py --overhead rtn        # writer vs bare quantize, interleaved
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from synth_hf import SynthSpec, checkpoint_bytes, write_synthetic_mixtral  # noqa: E402

RECIPES = {
    "rtn": str(HERE / "recipes" / "experts-int4-g64-rtn.toml"),
    "hqq": str(HERE / "recipes" / "experts-int4-g64-hqq.toml"),
    "experts-4bit": "experts-4bit",
}
DEFAULT_SRC = Path(tempfile.gettempdir()) / "moe-bench" / "synth-mixtral"
DEFAULT_HQQ_SITE = Path(tempfile.gettempdir()) / "bench-site"  # pip install --no-deps --target here
TARGET_MBPS = 50.0  # MB/s of bf16 input, calibration-free 4-bit on 2 cores
TARGET_RSS_BASE = 1.5e9  # bytes, plus two layers of source weights
_TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- machine


def _machine_busy_seconds() -> float:
    """CPU-seconds all cores spent busy since boot (``/proc/stat`` minus idle and iowait)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is already in user
    busy = vals[0] + vals[1] + vals[2] + vals[5] + vals[6] + (vals[7] if len(vals) > 7 else 0)
    return busy / _TICK


def other_cores(busy0: float, busy1: float, own_cpu: float, wall: float) -> float:
    """Average cores used by other processes over an interval (machine busy minus our own CPU)."""
    return max(0.0, (busy1 - busy0 - own_cpu) / max(wall, 1e-9))


def wait_quiet(max_wait: float, threshold: float = 0.25, window: float = 2.0) -> float:
    """Wait up to ``max_wait`` s until other processes use under ``threshold`` cores; return the last load."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, c0, t0 = _machine_busy_seconds(), time.process_time(), time.monotonic()
        time.sleep(window)
        load = other_cores(b0, _machine_busy_seconds(), time.process_time() - c0, time.monotonic() - t0)
        if load < threshold or time.monotonic() >= deadline:
            return load


def evict_page_cache(folder: Path) -> int:
    """Drop ``folder``'s safetensors shards from the page cache; return the bytes still cached (or -1)."""
    shards = sorted(folder.glob("*.safetensors"))
    for p in shards:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if not shutil.which("fincore"):
        return -1
    out = subprocess.run(
        ["fincore", "-b", "-n", "-o", "RES", *map(str, shards)], capture_output=True, text=True
    )
    return sum(int(x) for x in out.stdout.split()) if out.returncode == 0 else -1


def package_fingerprint() -> dict:
    """sha256 (first 12 hex digits) of the package's quantize path, so numbers tie to a code version."""
    import hashlib

    import moe_local

    root = Path(moe_local.__file__).parent
    names = ["format/writer.py", "quant/rtn.py", "quant/hqq.py", "quant/pack.py", "loading/safetensors_io.py"]
    out = {}
    for name in names:
        f = root / name
        if f.exists():
            out[name] = hashlib.sha256(f.read_bytes()).hexdigest()[:12]
    return out


def machine_info() -> dict:
    """CPU model, cores, RAM, torch build and date, for the results header."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "package": package_fingerprint(),
    }


# ---------------------------------------------------------------------------------------------- part a


def source_layer_bytes(src: Path) -> int:
    """Bytes of the largest layer's source tensors (``model.layers.{L}.*``) from the shard headers."""
    from moe_local.format.safetensors_io import CheckpointFiles

    files = CheckpointFiles(src)
    per_layer: dict[int, int] = {}
    for key in files.names():
        m = re.match(r"model\.layers\.(\d+)\.", key)
        if m:
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + files.info(key).nbytes
    return max(per_layer.values())


@dataclass
class E2ERun:
    """One end-to-end ``moe-local quantize`` child process."""

    wall_s: float
    writer_s: float  # the CLI's own "in X s" (quantize_checkpoint, without interpreter start-up)
    peak_rss: int  # ru_maxrss of the child, bytes
    polled_peak_rss: int  # max VmRSS seen by polling every 50 ms, bytes
    child_cpu_s: float  # user + system CPU of the child
    other_cores: float  # cores other processes used meanwhile
    cached_before: int  # source bytes in the page cache at start (-1: unknown)
    out_bytes: int
    package: dict  # package_fingerprint() at launch: the package changes under concurrent edits


def _poll_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    while not stop.wait(0.05):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        except OSError:
            return


def run_e2e_once(src: Path, out: Path, recipe: str, threads: int, log: Path | None = None) -> E2ERun:
    """Run ``python -m moe_local quantize`` once from a cold page cache and measure it."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    cached = evict_page_cache(src)
    fingerprint = package_fingerprint()
    env = {**os.environ, "MOE_LOCAL_THREADS": str(threads), "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "moe_local", "quantize", str(src), str(out), "--recipe", recipe]
    b0, t0 = _machine_busy_seconds(), time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout:
        proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT)
        stop, peak = threading.Event(), [0]
        poller = threading.Thread(target=_poll_rss, args=(proc.pid, stop, peak), daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        b1 = _machine_busy_seconds()
        stop.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        text = stdout.read()
    if log is not None:
        log.write_text(text)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    m = re.search(r"\) in ([0-9.]+) s to ", text)
    cpu = usage.ru_utime + usage.ru_stime
    out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return E2ERun(
        wall_s=wall,
        writer_s=float(m.group(1)) if m else float("nan"),
        peak_rss=usage.ru_maxrss * 1024,
        polled_peak_rss=peak[0],
        child_cpu_s=cpu,
        other_cores=other_cores(b0, b1, cpu, wall),
        cached_before=cached,
        out_bytes=out_bytes,
        package=fingerprint,
    )


@dataclass
class E2EResult:
    """Repeated end-to-end runs of one recipe, summarized."""

    recipe: str
    recipe_arg: str
    input_bytes: int
    runs: list[E2ERun] = field(default_factory=list)

    def median(self, attr: str) -> float:
        """Median of one ``E2ERun`` field over the runs."""
        return statistics.median(getattr(r, attr) for r in self.runs)

    def summary(self) -> dict:
        """Medians, throughputs and the worst contention."""
        wall, writer = self.median("wall_s"), self.median("writer_s")
        return {
            "recipe": self.recipe,
            "input_bytes": self.input_bytes,
            "runs": len(self.runs),
            "wall_s": wall,
            "writer_s": writer,
            "mbps_wall": self.input_bytes / wall / 1e6,
            "mbps_writer": self.input_bytes / writer / 1e6,
            "best_mbps_wall": self.input_bytes / min(r.wall_s for r in self.runs) / 1e6,
            "peak_rss": max(r.peak_rss for r in self.runs),
            "child_cpu_s": self.median("child_cpu_s"),
            "max_other_cores": max(r.other_cores for r in self.runs),
            "max_cached_before": max(r.cached_before for r in self.runs),
            "out_bytes": self.runs[-1].out_bytes,
            "each_run": [asdict(r) for r in self.runs],
        }


def bench_e2e(args, src: Path, input_bytes: int) -> list[E2EResult]:
    """Part a: every requested recipe, ``args.e2e_runs`` times each."""
    results = []
    for name in args.recipes:
        res = E2EResult(name, RECIPES.get(name, name), input_bytes)
        for i in range(args.e2e_runs):
            if args.quiet_wait:
                wait_quiet(args.quiet_wait)
            out = args.work / f"q-{Path(name).stem}"
            run = run_e2e_once(src, out, res.recipe_arg, args.threads, args.work / f"q-{Path(name).stem}.log")
            res.runs.append(run)
            long_run = run.wall_s > args.long_s and i + 1 < args.e2e_runs
            print(
                f"e2e {name} run {i + 1}: wall {run.wall_s:.1f} s, writer {run.writer_s:.1f} s, "
                f"{input_bytes / run.wall_s / 1e6:.1f} MB/s, peak RSS {run.peak_rss / 1e6:.0f} MB "
                f"(polled {run.polled_peak_rss / 1e6:.0f}), cpu {run.child_cpu_s:.1f} s, "
                f"others {run.other_cores:.2f} cores, cached before {run.cached_before / 1e6:.0f} MB",
                flush=True,
            )
            if long_run:
                print(f"e2e {name}: one run only (it took over {args.long_s:.0f} s)", flush=True)
                break
        shutil.rmtree(args.work / f"q-{Path(name).stem}", ignore_errors=True)
        results.append(res)
    return results


# ---------------------------------------------------------------------------------------------- part b


@dataclass
class Timed:
    """Repeated calls of one function: wall and CPU seconds and the others' cores during each call."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # this process's CPU seconds (all its threads)
    others: list[float] = field(default_factory=list)
    result: object = None


def time_runs(fn: Callable[[], object], runs: int, quiet_wait: float) -> Timed:
    """Call ``fn`` ``runs`` times (waiting for a quiet machine first when asked) and time each call."""
    t = Timed()
    for _ in range(runs):
        if quiet_wait:
            wait_quiet(quiet_wait)
        t.result = None
        b0, c0, t0 = _machine_busy_seconds(), time.process_time(), time.perf_counter()
        t.result = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        t.others.append(other_cores(b0, _machine_busy_seconds(), cpu, wall))
        t.wall.append(wall)
        t.cpu.append(cpu)
    return t


@dataclass
class MatrixResult:
    """Repeated runs of one quantizer on the benchmark matrix."""

    name: str
    timed: Timed
    rel_error: float
    note: str = ""

    def summary(self, nbytes: int) -> dict:
        """Median wall and CPU time, MB/s of bf16 input (wall, and per CPU-second), error, contention."""
        wall, cpu = self.timed.wall, self.timed.cpu
        med = statistics.median(wall)
        return {
            "name": self.name,
            "runs": len(wall),
            "median_s": med,
            "min_s": min(wall),
            "mbps": nbytes / med / 1e6,
            "best_mbps": nbytes / min(wall) / 1e6,
            "median_cpu_s": statistics.median(cpu),
            "mb_per_cpu_s": nbytes / statistics.median(cpu) / 1e6,
            "rel_error": self.rel_error,
            "max_other_cores": max(self.timed.others),
            "note": self.note,
            "each_s": wall,
            "each_cpu_s": cpu,
        }


def rel_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``||W - W_hat||_F / ||W||_F`` in float64."""
    w64 = w.double()
    return float((w64 - w_hat.double()).norm() / w64.norm())


def _fmt(t: Timed) -> str:
    walls = ", ".join(f"{x:.2f}" for x in t.wall)
    cpus = ", ".join(f"{x:.1f}" for x in t.cpu)
    others = ", ".join(f"{x:.2f}" for x in t.others)
    return f"wall [{walls}] s, cpu [{cpus}] s, others [{others}] cores"


def _hqq_lib(site: Path):
    """Import the ``hqq`` package's Quantizer (from ``site`` if given), or return the import error."""
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))  # appended: the environment's torch always wins
    try:
        from hqq.core.quantize import Quantizer
    except Exception as exc:  # any failure means: no comparison
        return None, f"{type(exc).__name__}: {exc}"
    import hqq

    return Quantizer, getattr(hqq, "__version__", "?")


def bench_matrix(args) -> tuple[list[MatrixResult], int]:
    """Part b: moe_local rtn/hqq (bf16 and fp32 input) and the hqq package on one [O, I] bf16 matrix."""
    from moe_local.quant import quantize

    o, i = args.matrix
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(o, i, generator=gen).mul_(i**-0.5).to(torch.bfloat16)
    nbytes = w.numel() * w.element_size()
    quantize(w[:64], "int4-g64-hqq")  # one-time warm-up of the ops
    results = []
    for method, scheme in (("rtn", "int4-g64"), ("hqq", "int4-g64-hqq")):
        for given in ("bf16", "fp32"):

            def fn(scheme=scheme, given=given):
                return quantize(w if given == "bf16" else w.float(), scheme)

            timed = time_runs(fn, args.runs, args.quiet_wait)
            note = "w.float() inside the timing" if given == "fp32" else ""
            err = rel_error(w, timed.result.dequantize())
            timed.result = None
            results.append(MatrixResult(f"moe_local {method} (given {given})", timed, err, note))
            print(f"matrix {results[-1].name}: {_fmt(timed)}, err {err:.5f}", flush=True)
    if args.skip_hqq_lib:
        return results, nbytes
    Quantizer, version = _hqq_lib(args.hqq_site)
    if Quantizer is None:
        print(f"hqq package not importable, comparison skipped: {version}", flush=True)
        results.append(
            MatrixResult("hqq package", Timed([float("nan")], [float("nan")], [0.0]), float("nan"), version)
        )
        return results, nbytes

    def hqq_fn():
        return Quantizer.quantize(
            w, nbits=4, group_size=64, axis=1, optimize=True, device="cpu", compute_dtype=torch.float32
        )

    timed = time_runs(hqq_fn, args.runs, args.quiet_wait)
    w_q, meta = timed.result
    timed.result = None
    meta["compute_dtype"] = torch.float32
    err32 = rel_error(w, Quantizer.dequantize(w_q, meta))
    meta16 = {**meta, "scale": meta["scale"].half().float(), "zero": meta["zero"].half().float()}
    err16 = rel_error(w, Quantizer.dequantize(w_q, meta16))
    note = f"hqq {version}, optimize=True axis=1; fp32 scale/zero (fp16-rounded: {err16:.5f})"
    results.append(MatrixResult("hqq package", timed, err32, note))
    print(f"matrix hqq package: {_fmt(timed)}, err {err32:.5f} / {err16:.5f}", flush=True)
    return results, nbytes


HQQ_VARIANTS = (  # (label, HqqConfig fields): where moe_local's hqq time goes, and what each part buys
    ("rtn params only (iters=0, polish=0)", {"iters": 0, "polish_iters": 0}),
    ("half-quadratic only (iters=20, polish=0)", {"polish_iters": 0}),
    ("polish only (iters=0, polish=6)", {"iters": 0}),
    ("default (iters=20, polish=6)", {}),
    ("short (iters=5, polish=2)", {"iters": 5, "polish_iters": 2}),
    ("lp_norm=0.7 (pow instead of rsqrt)", {"lp_norm": 0.7}),
)


def hqq_breakdown(args) -> list[dict]:
    """Time and error of moe_local's hqq with parts of its optimization switched off (bf16 input)."""
    from moe_local.quant import HqqConfig, quantize

    o, i = args.matrix
    w = torch.randn(o, i, generator=torch.Generator().manual_seed(0)).mul_(i**-0.5).to(torch.bfloat16)
    nbytes = w.numel() * w.element_size()
    quantize(w[:64], "int4-g64-hqq")
    rows = []
    for label, fields in HQQ_VARIANTS:
        cfg = HqqConfig(**fields)
        timed = time_runs(
            lambda cfg=cfg: quantize(w, "int4-g64-hqq", hqq_config=cfg), args.runs, args.quiet_wait
        )
        err = rel_error(w, timed.result.dequantize())
        timed.result = None
        r = {"variant": label, **MatrixResult(label, timed, err).summary(nbytes)}
        rows.append(r)
        print(
            f"| {label} | {r['median_s']:.2f} | {r['mbps']:.1f} | {r['median_cpu_s']:.1f} | "
            f"{r['mb_per_cpu_s']:.1f} | {r['rel_error']:.5f} | {r['max_other_cores']:.2f} |",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------- profile


def writer_overhead(args, recipe: str) -> list[dict]:
    """In one process, alternate ``quantize`` over a checkpoint's expert tensors (already in RAM, gate_up
    joined as the writer joins it) and ``quantize_checkpoint`` on the same checkpoint (cold page cache),
    so both see the same machine load; return each pair's times."""
    from moe_local.convert.writer import quantize_checkpoint
    from moe_local.format.safetensors_io import CheckpointFiles
    from moe_local.quant import quantize
    from moe_local.recipes import load_recipe

    src = args.overhead_src
    if not (src / "model.safetensors.index.json").exists():
        write_synthetic_mixtral(src, SynthSpec(layers=2, vocab=320), verbose=True)
    rec = load_recipe(RECIPES.get(recipe, recipe))
    files = CheckpointFiles(src)
    tensors, scheme = [], None
    for key in sorted(k for k in files.names() if k.endswith(".w2.weight")):
        prefix = key[: -len("w2.weight")]
        gate_up = torch.cat([files.read(prefix + "w1.weight"), files.read(prefix + "w3.weight")])
        tensors += [gate_up, files.read(key)]
        scheme = scheme or rec.scheme_for(prefix.replace("block_sparse_moe", "mlp") + "gate_up")
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    out = args.work / "q-overhead"
    quantize_checkpoint(src, out, rec, overwrite=True)  # imports and one-time set-up
    rows = []
    for _ in range(args.runs):
        c0, t0 = time.process_time(), time.perf_counter()
        for t in tensors:
            quantize(t, scheme)
        mat_wall, mat_cpu = time.perf_counter() - t0, time.process_time() - c0
        evict_page_cache(src)
        c0, t0 = time.process_time(), time.perf_counter()
        quantize_checkpoint(src, out, rec, overwrite=True)
        wr_wall, wr_cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append(
            {"matrix_s": mat_wall, "matrix_cpu_s": mat_cpu, "writer_s": wr_wall, "writer_cpu_s": wr_cpu}
        )
        print(
            f"| {recipe} | {nbytes / 1e6:.0f} | {mat_wall:.2f} ({mat_cpu:.1f}) | "
            f"{wr_wall:.2f} ({wr_cpu:.1f}) | {wr_wall / mat_wall:.2f} |",
            flush=True,
        )
    shutil.rmtree(out, ignore_errors=True)
    return rows


SPY_FUNCS = (  # functions whose inclusive share of the main thread's samples the --spy summary shows
    "quantize_checkpoint",
    "build_on_meta",
    "_plan",
    "_write_dense",
    "_write_layer",
    "HfExperts.read",
    "pread_into",
    "_join",
    "_quantize",
    "quantize_groups",
    "rtn_fp16_params",
    "hqq_params",
    "_half_quadratic_zero",
    "_least_squares_polish",
    "assign_codes",
    "pack_codes",
    "_rel_err",
    "pack_blob",
    "checksum",
    "save_file",
)


def spy_e2e(args, src: Path, recipe: str) -> None:
    """Run the CLI under py-spy (CPU samples, 100 Hz) and print each key function's inclusive share."""
    spy = shutil.which("py-spy") or str(Path(tempfile.gettempdir()) / "bench-tools" / "bin" / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy not found: pip install --no-deps --target /tmp/bench-tools py-spy")
    out, raw = args.work / "q-spy", args.work / f"spy-{Path(recipe).stem}.txt"
    shutil.rmtree(out, ignore_errors=True)
    evict_page_cache(src)
    env = {**os.environ, "MOE_LOCAL_THREADS": str(args.threads)}
    cmd = [spy, "record", "-r", "100", "-f", "raw", "-o", str(raw), "--", sys.executable, "-m", "moe_local"]
    cmd += ["quantize", str(src), str(out), "--recipe", RECIPES.get(recipe, recipe)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    total, incl = 0, dict.fromkeys(SPY_FUNCS, 0)
    self_time: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "Thread._bootstrap" in stack:  # rich's refresh thread
            continue
        frames = stack.split(";")
        names = {f.split(" (")[0] for f in frames}
        total += int(n)
        for func in SPY_FUNCS:
            incl[func] += int(n) if func in names else 0
        leaf = frames[-1].split(" (")[0] + " (" + frames[-1].rsplit("/", 1)[-1]
        self_time[leaf] = self_time.get(leaf, 0) + int(n)
    print(
        f"py-spy {recipe}: wall {wall:.1f} s, {total} main-thread samples ({total / 100:.1f} CPU-s at 100 Hz)"
    )
    print(f"raw samples: {raw}\n\n| function (inclusive) | s | % |\n|---|---|---|")
    for func, n in incl.items():
        print(f"| {func} | {n / 100:.1f} | {100 * n / max(total, 1):.1f} |")
    print("\n| leaf frame (self) | s | % |\n|---|---|---|")
    for leaf, n in sorted(self_time.items(), key=lambda kv: -kv[1])[:15]:
        print(f"| {leaf} | {n / 100:.1f} | {100 * n / max(total, 1):.1f} |")


def profile_writer(args, src: Path) -> None:
    """cProfile one in-process ``quantize_checkpoint`` run (cold cache) and print the top functions."""
    import cProfile
    import pstats

    from moe_local.convert.writer import quantize_checkpoint
    from moe_local.recipes import load_recipe

    recipe = load_recipe(RECIPES.get(args.profile, args.profile))
    out = args.work / "q-profile"
    shutil.rmtree(out, ignore_errors=True)
    evict_page_cache(src)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(quantize_checkpoint, src, out, recipe, overwrite=True)
    print(f"profile {args.profile}: {time.perf_counter() - t0:.1f} s in quantize_checkpoint")
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(r"moe_local|safetensors", 30)
    shutil.rmtree(out, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- main


def _table(headers: list[str], rows: list[list[str]]) -> None:
    print("\n| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _print_tables(machine: dict, e2e: list[dict], matrix: list[dict], target_rss: float, args) -> None:
    print(f"\n## {machine['date']}: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB")
    if e2e:
        heads = ["recipe", "runs", "wall s", "MB/s (wall)", "MB/s (writer)", "CPU s", "MB/CPU-s"]
        heads += ["peak RSS MB", "target MB", "others"]
        rows = [
            [
                r["recipe"],
                str(r["runs"]),
                f"{r['wall_s']:.1f}",
                f"{r['mbps_wall']:.1f}",
                f"{r['mbps_writer']:.1f}",
                f"{r['child_cpu_s']:.1f}",
                f"{r['input_bytes'] / r['child_cpu_s'] / 1e6:.1f}",
                f"{r['peak_rss'] / 1e6:.0f}",
                f"{target_rss / 1e6:.0f}",
                f"{r['max_other_cores']:.2f}",
            ]
            for r in e2e
        ]
        _table(heads, rows)
    if matrix:
        print(f"\nmatrix {args.matrix[0]}x{args.matrix[1]} bf16, int4-g64:")
        heads = ["quantizer", "runs", "median s", "MB/s", "best MB/s", "CPU s", "MB/CPU-s", "rel. error"]
        heads += ["others", "note"]
        rows = [
            [
                r["name"],
                str(r["runs"]),
                f"{r['median_s']:.2f}",
                f"{r['mbps']:.1f}",
                f"{r['best_mbps']:.1f}",
                f"{r['median_cpu_s']:.1f}",
                f"{r['mb_per_cpu_s']:.1f}",
                f"{r['rel_error']:.5f}",
                f"{r['max_other_cores']:.2f}",
                r["note"],
            ]
            for r in matrix
        ]
        _table(heads, rows)


def main(argv: list[str] | None = None) -> None:
    """Command line; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--src", type=Path, default=DEFAULT_SRC, help="checkpoint (written with synth_hf if missing)"
    )
    p.add_argument("--work", type=Path, default=DEFAULT_SRC.parent, help="where outputs and logs go")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), help="rtn, hqq, experts-4bit or a .toml")
    p.add_argument("--threads", type=int, default=2, help="torch threads (MOE_LOCAL_THREADS for the CLI)")
    p.add_argument("--runs", type=int, default=3, help="runs per matrix-level measurement")
    p.add_argument("--e2e-runs", type=int, default=3, help="runs per end-to-end recipe")
    p.add_argument("--long-s", type=float, default=60.0, help="an e2e run longer than this is not repeated")
    p.add_argument("--matrix", type=int, nargs=2, default=(14336, 4096), metavar=("O", "I"))
    p.add_argument("--hqq-site", type=Path, default=DEFAULT_HQQ_SITE, help="extra sys.path for `hqq`")
    p.add_argument("--quiet-wait", type=float, default=0.0, help="wait up to N s for an idle machine per run")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-matrix", action="store_true")
    p.add_argument("--skip-hqq-lib", action="store_true", help="leave the hqq package out of part b")
    p.add_argument("--profile", metavar="RECIPE", help="only profile one in-process writer run")
    p.add_argument("--hqq-breakdown", action="store_true", help="only time hqq with parts switched off")
    p.add_argument("--spy", metavar="RECIPE", help="only run the CLI once under py-spy and summarize")
    p.add_argument("--overhead", metavar="RECIPE", help="only compare the writer with bare quantize")
    p.add_argument(
        "--overhead-src", type=Path, default=DEFAULT_SRC.with_name("synth-2l"), help="2-layer checkpoint"
    )
    p.add_argument("--json", type=Path, help="write all results here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.hqq_breakdown:
        print("| variant | median s | MB/s | CPU s | MB/CPU-s | rel. error | others |", flush=True)
        print("|---|---|---|---|---|---|---|", flush=True)
        rows = hqq_breakdown(args)
        if args.json:
            args.json.write_text(
                json.dumps({"machine": machine_info(), "hqq_breakdown": rows}, indent=2) + "\n"
            )
        return
    if args.overhead:
        print("| recipe | expert MB | quantize s (CPU s) | writer s (CPU s) | writer / quantize |")
        print("|---|---|---|---|---|", flush=True)
        writer_overhead(args, args.overhead)
        return
    if not (args.src / "model.safetensors.index.json").exists():
        print(f"writing the synthetic checkpoint {args.src} ...", flush=True)
        write_synthetic_mixtral(args.src, SynthSpec(), verbose=True)
    if args.profile:
        profile_writer(args, args.src)
        return
    if args.spy:
        spy_e2e(args, args.src, args.spy)
        return
    machine = machine_info()
    input_bytes = checkpoint_bytes(args.src)
    layer_bytes = source_layer_bytes(args.src)
    target_rss = TARGET_RSS_BASE + 2 * layer_bytes
    print(f"source {args.src}: {input_bytes / 1e6:.0f} MB bf16, largest layer {layer_bytes / 1e6:.0f} MB")

    e2e = [r.summary() for r in bench_e2e(args, args.src, input_bytes)] if not args.skip_e2e else []
    matrix: list[dict] = []
    if not args.skip_matrix:
        results, nbytes = bench_matrix(args)
        matrix = [r.summary(nbytes) for r in results]
    _print_tables(machine, e2e, matrix, target_rss, args)
    if args.json:
        data = {
            "machine": machine,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "source": {"path": str(args.src), "bytes": input_bytes, "layer_bytes": layer_bytes},
            "targets": {"mbps": TARGET_MBPS, "peak_rss": target_rss},
            "e2e": e2e,
            "matrix": matrix,
        }
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
