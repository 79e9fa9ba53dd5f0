"""One measured run of either engine, as a child process: speeds, peak RSS, cgroup counters.

Every run is wrapped in ``/usr/bin/time -f %M`` for the child's peak RSS (the same measure for
both engines; llama.cpp's mmap'd weights count once touched) and records the 1-minute load
average at its start, since the benchmark shares its 2 cores with other work.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cgroup import MemoryCgroup

HERE = Path(__file__).resolve().parent
TIME = "/usr/bin/time"


@dataclass(frozen=True)
class RunSpec:
    """What to run: engine, model file or folder, threads, token counts, optional memory cap."""

    engine: str  # "llama.cpp" or "moe-local"
    workload: str  # "bf16" or "4-bit"
    model: Path
    threads: int
    prompt_tokens: int
    new_tokens: int
    cap: int | None = None  # cgroup limit in bytes; None: uncapped
    flags: tuple[str, ...] = ()  # extra engine flags (budgets, load mode) for a capped run


@dataclass(frozen=True)
class RunResult:
    """One run's measurements; None where the run did not produce the number."""

    spec: dict
    command: str
    rep: int
    load_avg_start: float
    wall_s: float
    rc: int
    decode_tps: float | None = None
    prefill_tps: float | None = None
    peak_rss: int | None = None
    cgroup: dict | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The run finished and reported its speeds."""
        return self.rc == 0 and self.decode_tps is not None


def command_for(spec: RunSpec, llama_bench: Path, json_out: Path) -> tuple[list[str], dict[str, str]]:
    """The engine's command line and extra environment for ``spec``."""
    if spec.engine == "llama.cpp":
        cmd = [str(llama_bench), "-m", str(spec.model), "-t", str(spec.threads)]
        cmd += ["-p", str(spec.prompt_tokens), "-n", str(spec.new_tokens), "-r", "1", "-o", "json"]
        if spec.prompt_tokens > 0 and spec.new_tokens > 0:
            # moe-local decodes after the prompt: llama.cpp's decode is timed at the same depth (its
            # tg test starts from an empty context, 14% faster on the 1.6 GB model at 512 tokens)
            cmd += ["-d", f"0,{spec.prompt_tokens}"]
        return cmd + list(spec.flags), {}
    env = {"MOE_LOCAL_THREADS": str(spec.threads)}
    args = [str(spec.model), "--prompt-tokens", str(max(spec.prompt_tokens, 1))]
    args += ["--new-tokens", str(spec.new_tokens), "--json", str(json_out), *spec.flags]
    if spec.cap is None:
        return ["moe-local", "bench", *args], env
    return ["python", str(HERE / "ml_child.py"), *args], env


def shell_line(cmd: list[str], env: dict[str, str], cap: int | None) -> str:
    """The command as one would type it (cgroup set-up summarised in front)."""
    text = " ".join(f"{k}={v}" for k, v in env.items())
    text = (text + " " if text else "") + shlex.join(cmd)
    if cap is not None:
        text = f"[memory cgroup limit {cap} B, page cache dropped] " + text
    return text


def _parse_llama(stdout: str) -> tuple[float | None, float | None, dict]:
    """(decode tokens/s, prefill tokens/s, build info) from ``llama-bench -o json``."""
    rows = json.loads(stdout)
    if not rows:
        return None, None, {}
    # decode at the deepest context timed (the prompt's length, as moe-local's), prefill from empty
    gen = sorted(
        (r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0), key=lambda r: r.get("n_depth", 0)
    )
    decode = gen[-1]["avg_ts"] if gen else None
    prefill = next(
        (r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0 and not r.get("n_depth")), None
    )
    keys = ("build_commit", "build_number", "cpu_info", "model_type", "model_size")
    info = {k: rows[0].get(k) for k in keys}
    return decode, prefill, info


def run_once(spec: RunSpec, rep: int, llama_bench: Path, *, log=print) -> RunResult:
    """Run ``spec`` once in a child process and collect its numbers (never raises on a failed run)."""
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp:
        json_out, rss_out = Path(tmp) / "out.json", Path(tmp) / "rss"
        cmd, env = command_for(spec, llama_bench, json_out)
        line = shell_line([("OUT.json" if c == str(json_out) else c) for c in cmd], env, spec.cap)
        group = MemoryCgroup("moe-bench", spec.cap) if spec.cap is not None else None
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        try:
            res = subprocess.run(
                [TIME, "-f", "%M", "-o", str(rss_out), *cmd],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                preexec_fn=group.preexec if group else None,
                check=False,
            )
            wall = time.perf_counter() - t0
            stats = asdict(group.stats()) if group else None
        finally:
            if group:
                group.close()
        rc = res.returncode
        time_text = rss_out.read_text() if rss_out.exists() else ""
        rss = _read_rss(time_text)
        decode = prefill = None
        extra: dict = {}
        note = ""
        try:
            if spec.engine == "llama.cpp" and rc == 0:
                decode, prefill, extra = _parse_llama(res.stdout)
            elif rc == 0:
                data = json.loads(json_out.read_text())
                decode, prefill = data["decode_tokens_per_s"], data["prefill_tokens_per_s"]
                extra = {k: data.get(k) for k in ("expert_hit_rate", "expert_memory", "peak_rss_bytes")}
        except (json.JSONDecodeError, KeyError, OSError, StopIteration) as e:
            note = f"unreadable output: {e}"
        if rc != 0:
            note = _failure(res, rc, stats, time_text)
    result = RunResult(
        spec={k: str(v) if isinstance(v, Path) else v for k, v in asdict(spec).items()},
        command=line,
        rep=rep,
        load_avg_start=load,
        wall_s=wall,
        rc=rc,
        decode_tps=decode,
        prefill_tps=prefill if spec.prompt_tokens > 0 else None,
        peak_rss=rss,
        cgroup=stats,
        note=note,
        extra=extra,
    )
    log(summary(result))
    return result


def _read_rss(text: str) -> int | None:
    """Peak RSS in bytes from ``/usr/bin/time -f %M`` output (KiB, after any "terminated" line)."""
    lines = [ln for ln in text.splitlines() if ln.strip().isdigit()]
    return int(lines[-1]) * 1024 if lines else None


def _failure(res: subprocess.CompletedProcess, rc: int, stats: dict | None, time_text: str) -> str:
    """One line on why a run failed: OOM kill, a refusal, or the last line of its errors."""
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    killed = "signal 9" in time_text or rc in (137, -9)
    if stats and stats.get("oom_kills", 0) > 0:
        killed = True
    if killed:
        return "OOM-killed (SIGKILL from the cgroup's OOM killer)"
    last = next((ln for ln in reversed(err) if ln.startswith("error:")), err[-1] if err else "")
    return f"exit {rc}: {last.strip()[:400]}"


def summary(r: RunResult) -> str:
    """One log line for a run."""
    s = r.spec
    cap = f" cap {s['cap'] / 2**20:.0f}MiB" if s.get("cap") else ""
    speed = (
        f"decode {r.decode_tps:.2f} t/s" + (f", prefill {r.prefill_tps:.1f} t/s" if r.prefill_tps else "")
        if r.ok
        else r.note
    )
    rss = f", RSS {r.peak_rss / 2**20:.0f} MiB" if r.peak_rss else ""
    cg = f", cgroup max {r.cgroup['max_usage'] / 2**20:.0f} MiB" if r.cgroup else ""
    return (
        f"  [{s['engine']:>9} {s['workload']:>5} t={s['threads']}{cap} rep {r.rep}] {speed}{rss}{cg} "
        f"({r.wall_s:.0f} s, load {r.load_avg_start:.2f})"
    )


def runtime_floor_rss() -> int | None:
    """Peak RSS of a Python that only imports torch and moe-local's loader and bench (no model)."""
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp:
        out = Path(tmp) / "rss"
        code = "import torch, moe_local.bench, moe_local.loading.loader"
        subprocess.run([TIME, "-f", "%M", "-o", str(out), "python", "-c", code], check=False)
        return _read_rss(out.read_text()) if out.exists() else None
