"""The Markdown report of ``bench_llamacpp.py``: side-by-side medians, capped runs, raw runs.

Anything below the line ``<!-- notes -->`` of an existing report is kept, so commentary written
by hand survives a re-run.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Iterable
from pathlib import Path

from .runners import RunResult

NOTES = "<!-- notes -->"
MIB = 2**20


def machine() -> dict[str, str]:
    """CPU model, cores, RAM, kernel and Python of this machine."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        ram = f"{int(mem.split()[1]) / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        ram = "unknown"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None (None when there are none)."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _select(runs: list[RunResult], **spec) -> list[RunResult]:
    return [r for r in runs if all(r.spec.get(k) == v for k, v in spec.items())]


def _fmt(value: float | None, unit: str, n: int, digits: int = 2) -> str:
    if value is None:
        return "failed" if n else "-"
    return f"{value:.{digits}f} {unit} (n={n})"


def _ratio(ml: float | None, lc: float | None) -> str:
    return f"{ml / lc:.2f}x" if ml is not None and lc else "-"


def side_by_side(runs: list[RunResult], workloads: list[str], threads: list[int]) -> list[str]:
    """Rows ``workload | llama.cpp | moe-local | ratio`` of medians over the uncapped runs."""
    out = [
        "| workload | llama.cpp | moe-local | ratio (moe-local / llama.cpp) |",
        "|---|---|---|---|",
    ]
    metrics = (
        ("decode", "decode_tps", "tokens/s", 2, 1.0),
        ("prefill", "prefill_tps", "tokens/s", 1, 1.0),
        ("peak RSS", "peak_rss", "MiB", 0, 1 / MIB),
    )
    for w in workloads:
        for t in threads:
            for label, attr, unit, digits, scale in metrics:
                cells = []
                for engine in ("llama.cpp", "moe-local"):
                    sel = [r for r in _select(runs, engine=engine, workload=w, threads=t, cap=None) if r.ok]
                    m = median(getattr(r, attr) for r in sel)
                    cells.append((None if m is None else m * scale, len(sel)))
                name = f"{label} {w}, {t} thread{'s' if t > 1 else ''}"
                if label == "prefill":
                    n_prompt = next((r.spec["prompt_tokens"] for r in _select(runs, workload=w)), "")
                    name = f"prefill-{n_prompt} {w}, {t} thread{'s' if t > 1 else ''}"
                out.append(
                    f"| {name} | {_fmt(cells[0][0], unit, cells[0][1], digits)} | "
                    f"{_fmt(cells[1][0], unit, cells[1][1], digits)} | {_ratio(cells[1][0], cells[0][0])} |"
                )
    return out


def _outcome(r: RunResult) -> str:
    if r.ok:
        return f"{r.decode_tps:.2f} tokens/s"
    return r.note


def capped(runs: list[RunResult]) -> list[str]:
    """Under each cap: each engine's best working setting side by side, then every setting tried."""
    out = [
        "| workload | cap MiB | llama.cpp | moe-local | ratio (moe-local / llama.cpp) |",
        "|---|---|---|---|---|",
    ]
    keys = sorted({(r.spec["workload"], r.spec["cap"], r.spec["threads"]) for r in runs if r.spec["cap"]})
    for w, cap, t in keys:
        cells, speeds = [], []
        for engine in ("llama.cpp", "moe-local"):
            sel = _select(runs, engine=engine, workload=w, cap=cap, threads=t)
            by_flags: dict[tuple, list[RunResult]] = {}
            for r in sel:
                by_flags.setdefault(tuple(r.spec["flags"]), []).append(r)
            best = max(
                ((median(r.decode_tps for r in g if r.ok), f) for f, g in by_flags.items()),
                key=lambda x: x[0] or 0.0,
                default=(None, ()),
            )
            speeds.append(best[0])
            if best[0] is None:
                cells.append(f"no setting ran (last: {sel[-1].note.split(';')[0]})" if sel else "-")
            else:
                g = by_flags[best[1]]
                usage = max((r.cgroup or {}).get("max_usage", 0) for r in g) / MIB
                cells.append(
                    f"{best[0]:.2f} tokens/s (n={sum(r.ok for r in g)}) with `{' '.join(best[1])}`, "
                    f"cgroup max {usage:.0f} MiB"
                )
        name = f"decode {w}, {t} thread{'s' if t > 1 else ''}"
        out.append(f"| {name} | {cap / MIB:.0f} | {cells[0]} | {cells[1]} | {_ratio(speeds[1], speeds[0])} |")
    out += [
        "",
        "Every setting tried, in order (an engine's next setting runs only when the one before failed):",
        "",
        "| workload | cap MiB | engine | flags | outcome | cgroup max MiB | failcnt | OOM kills |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if not r.spec["cap"]:
            continue
        cg = r.cgroup or {}
        out.append(
            f"| {r.spec['workload']} | {r.spec['cap'] / MIB:.0f} | {r.spec['engine']} | "
            f"`{' '.join(r.spec['flags'])}` | {_outcome(r)} | {cg.get('max_usage', 0) / MIB:.0f} | "
            f"{cg.get('failcnt', '-')} | {cg.get('oom_kills', '-')} |"
        )
    return out


def raw_rows(runs: list[RunResult]) -> list[str]:
    """Every run: engine, workload, threads, cap, load average at its start, numbers, note."""
    out = [
        "| # | engine | workload | threads | cap MiB | rep | load avg | decode t/s | prefill t/s "
        "| peak RSS MiB | cgroup max MiB | failcnt | OOM kills | wall s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        s, cg = r.spec, r.cgroup or {}
        cap = f"{s['cap'] / MIB:.0f}" if s["cap"] else "-"

        def f(v, d=2):
            return "-" if v is None else f"{v:.{d}f}"

        out.append(
            f"| {i} | {s['engine']} | {s['workload']} | {s['threads']} | {cap} | {r.rep} | "
            f"{r.load_avg_start:.2f} | {f(r.decode_tps)} | {f(r.prefill_tps, 1)} | "
            f"{f(r.peak_rss / MIB if r.peak_rss else None, 0)} | "
            f"{f(cg['max_usage'] / MIB if cg else None, 0)} | {cg.get('failcnt', '-')} | "
            f"{cg.get('oom_kills', '-')} | {r.wall_s:.0f} | {r.note} |"
        )
    return out


def write_report(path: Path, sections: list[str]) -> None:
    """Write ``sections`` to ``path``, keeping whatever an existing file has below ``NOTES``."""
    kept = ""
    if path.exists():
        text = path.read_text()
        if NOTES in text:
            kept = text[text.index(NOTES) + len(NOTES) :].lstrip("\n")
    body = "\n".join(sections).rstrip() + f"\n\n{NOTES}\n"
    path.write_text(body + (("\n" + kept) if kept else ""))
