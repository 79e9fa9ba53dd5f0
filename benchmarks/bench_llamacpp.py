"""Benchmark moe-local against llama.cpp on the same weights: decode, prefill, peak RSS, memory caps.

One synthetic Mixtral-shaped bf16 checkpoint (``benchmarks/synth_hf.py``: hidden 1024, expert FFN
3584, 8 layers, 8 experts, top-2, about 1.6 GB) in two precisions per engine:

* bf16: llama.cpp runs the GGUF that its own ``convert_hf_to_gguf.py`` makes of the folder;
  moe-local runs the folder itself, with its default dtype (``auto``: bf16 compute on the CPU).
* 4-bit: llama.cpp ``Q4_0`` (``llama-quantize``); moe-local ``all-4bit`` (``moe-local quantize
  --recipe all-4bit``: experts and q/o attention int4-g64 hqq, k/v attention and lm_head int8-g128,
  embeddings and norms kept), the same choices as Q4_0's and about the same bytes per token.

Uncapped, for each thread count and precision, the engines alternate (the order flips every
round), ``--reps`` rounds, medians reported: llama.cpp ``llama-bench -m X -t N -p 512 -n 64 -r 1
-o json -d 0,512`` (one repetition per round; prefill from an empty context, decode at depth 512,
where moe-local's decode runs after its prompt); moe-local ``MOE_LOCAL_THREADS=N moe-local bench MODEL
--prompt-tokens 512 --new-tokens 64 --json F``. Peak RSS of each child by ``/usr/bin/time``.

Capped, where cgroup v1 works: a memory cgroup (page cache charged) around each child, the page
cache dropped first; caps of the dense part + ``--cap-fraction`` of the experts (``auto``) and
that + 512 MiB (moe-local's runtime allowance), decode only. Each engine tries settings in order
until one runs (``capped_settings``): llama.cpp ``-p 0 -lm mmap``, then also ``--repack 0``;
moe-local ``--cpu-memory CAP`` (for bf16 then with ``--dtype bfloat16``), then ``--expert-memory``
of the cap's share, through ``benchmarks/llamacpp/ml_child.py`` (``moe-local bench`` without its
second, all-resident load). Recorded: decode speed, cgroup peak usage, limit hits, OOM kills.

llama.cpp is built once (CPU, ``-DGGML_NATIVE=ON``) from the ``llama-cpp-python`` sdist's
sources, and the checkpoints are made once, in ``$MOE_LOCAL_BENCH_CACHE`` (default
``~/.cache/moe-local-bench``; llama.cpp in ``$MOE_LOCAL_BENCH_LLAMACPP``, default
``CACHE/llama.cpp``). The table, machine, commands and every run go to
``benchmarks/RESULTS-llamacpp.md``; the raw runs also to ``CACHE/last-run.json``.

Usage::

    python benchmarks/bench_llamacpp.py                 # full run (build and checkpoints once)
    python benchmarks/bench_llamacpp.py --quick         # smoke: 1 rep, 1 thread, 64-token prefill
    python benchmarks/bench_llamacpp.py --cap 700MiB --cap auto   # explicit caps
    python benchmarks/bench_llamacpp.py --cap none      # no capped runs
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from llamacpp import report  # noqa: E402
from llamacpp.build import CMAKE_FLAGS, default_root, ensure_llamacpp  # noqa: E402
from llamacpp.cgroup import cgroup_problem, drop_page_cache  # noqa: E402
from llamacpp.models import SHAPES, checkpoints_root, ensure_checkpoints, gguf_sizes, moe_local_sizes  # noqa: E402
from llamacpp.runners import RunResult, RunSpec, run_once, runtime_floor_rss  # noqa: E402

MIB = 2**20
ENGINES = ("llama.cpp", "moe-local")


class Phases:
    """Times each phase and prints it, for the report and for planning re-runs."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        """Time the block as phase ``name``."""
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - t0
            self.times.append((name, took))
            print(f"== {name}: {took:.0f} s", flush=True)


def ensure_python_deps() -> None:
    """The converter imports ``sentencepiece`` even for a BPE tokenizer; install it alone if missing."""
    if importlib.util.find_spec("sentencepiece") is None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "sentencepiece"]
        print("$ " + " ".join(cmd))
        subprocess.run(cmd, check=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``--quick`` turns the defaults into a smoke run)."""
    cache = Path(os.environ.get("MOE_LOCAL_BENCH_CACHE", "~/.cache/moe-local-bench")).expanduser()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 rep, 1 thread, 64-token prefill, 16 new tokens")
    p.add_argument("--reps", type=int, help="rounds of alternating runs (default 3; --quick 1)")
    p.add_argument("--threads", type=int, nargs="+", help="thread counts (default 1 2; --quick 1)")
    p.add_argument("--prompt-tokens", type=int, help="prefill length (default 512; --quick 64)")
    p.add_argument("--new-tokens", type=int, help="decode length (default 64; --quick 16)")
    p.add_argument("--workloads", nargs="+", default=["bf16", "4-bit"], choices=["bf16", "4-bit"])
    p.add_argument(
        "--cap",
        action="append",
        help="memory cap for decode runs: 'auto' (dense + --cap-fraction of experts), 'auto+SIZE', "
        "a size such as 700MiB, or 'none'; repeatable (default: auto and auto+512MiB)",
    )
    p.add_argument("--cap-fraction", type=float, default=0.3, help="share of the experts in an 'auto' cap")
    p.add_argument("--cap-threads", type=int, default=1, help="threads of the capped runs")
    p.add_argument("--cap-reps", type=int, help="rounds of capped runs (default 1)")
    p.add_argument("--cap-new-tokens", type=int, help="decode length of capped runs (default 32; --quick 16)")
    p.add_argument("--cache", type=Path, default=cache, help=f"benchmark cache (default {cache})")
    p.add_argument(
        "--shape",
        default="default",
        choices=sorted(SHAPES),
        help="checkpoint shape: the 1.6 GB default, or 2 layers of real Mixtral-8x7B (7 GB in bf16)",
    )
    p.add_argument("--jobs", type=int, default=2, help="build jobs for llama.cpp")
    p.add_argument(
        "--md", type=Path, help="report (default benchmarks/RESULTS-llamacpp.md; --quick: in the cache)"
    )
    a = p.parse_args(argv)
    a.reps = a.reps or (1 if a.quick else 3)
    a.threads = a.threads or ([1] if a.quick else [1, 2])
    a.prompt_tokens = a.prompt_tokens or (64 if a.quick else 512)
    a.new_tokens = a.new_tokens or (16 if a.quick else 64)
    a.cap = a.cap or ["auto", "auto+512MiB"]
    a.cap_reps = a.cap_reps or 1
    a.cap_new_tokens = a.cap_new_tokens or (16 if a.quick else 32)
    suffix = "" if a.shape == "default" else f"-{a.shape}"
    quick_md = a.cache / f"RESULTS-llamacpp-quick{suffix}.md"
    a.md = a.md or (quick_md if a.quick else HERE / f"RESULTS-llamacpp{suffix}.md")
    return a


def resolve_caps(items: list[str], sizes: dict[str, tuple[int, int]], fraction: float) -> list[int]:
    """Cap bytes for one workload; ``auto`` takes the larger engine's dense + fraction x experts."""
    from moe_local.units import parse_size

    auto = max(dense + int(fraction * experts) for dense, experts in sizes.values())
    caps = []
    for item in items:
        text = item.strip().lower()
        if text == "none":
            continue
        if text.startswith("auto"):
            extra = text.removeprefix("auto").lstrip("+")
            caps.append(auto + (parse_size(extra) if extra else 0))
        else:
            caps.append(parse_size(item))
    # whole MiB: the kernel rounds a limit down to pages, and moe-local refuses --cpu-memory above it
    return [c // MIB * MIB for c in caps]


def uncapped_runs(a, models, llama_bench: Path) -> list[RunResult]:
    """Rounds of alternating runs, every thread count and workload, the order flipping each time."""
    runs: list[RunResult] = []
    points = [(threads, w) for threads in a.threads for w in a.workloads]
    for rep in range(a.reps):
        for i, (threads, w) in enumerate(points):
            # the order alternates within a round and flips for each point from round to round
            for engine in ENGINES if (rep + i) % 2 == 0 else ENGINES[::-1]:
                spec = RunSpec(engine, w, models[w][engine], threads, a.prompt_tokens, a.new_tokens)
                runs.append(run_once(spec, rep, llama_bench))
    return runs


def capped_settings(engine: str, w: str, cap: int, budget: int) -> list[tuple[str, ...]]:
    """The flag sets an engine tries under ``cap``, in order, the next only when one fails.

    llama.cpp: weights mmap'd, then also without its CPU repacking (Q4_0 is copied into anonymous
    interleaved buffers by default, which a cap cannot reclaim). moe-local: told the cap
    (``--cpu-memory``); for bf16 then also with ``--dtype bfloat16`` explicitly (the default already
    computes a bf16 checkpoint in bf16 where the native kernel runs, else in float32, twice the
    bytes); then the cap's share of experts (``--expert-memory``) where the planner refuses the cap.
    """
    if engine == "llama.cpp":
        return [("-lm", "mmap"), ("-lm", "mmap", "--repack", "0")]
    told = ("--cpu-memory", str(cap))
    share = ("--expert-memory", str(budget))
    if w == "bf16":
        bf16 = ("--dtype", "bfloat16")
        return [told, told + bf16, share + bf16]
    return [told, share]


def capped_runs(a, models, sizes, llama_bench: Path) -> tuple[list[RunResult], list[str]]:
    """Decode under each cap in a fresh memory cgroup, page cache dropped before each run."""
    problem = cgroup_problem()
    if problem:
        return [], [f"Capped runs skipped: {problem}."]
    runs: list[RunResult] = []
    start: dict[tuple, int] = {}  # the first setting that ran, for later rounds
    points = [(w, cap) for w in a.workloads for cap in resolve_caps(a.cap, sizes[w], a.cap_fraction)]
    for rep in range(a.cap_reps):
        for i, (w, cap) in enumerate(points):
            budget = int(a.cap_fraction * sizes[w]["moe-local"][1])
            for engine in ENGINES if (rep + i) % 2 == 0 else ENGINES[::-1]:
                settings = capped_settings(engine, w, cap, budget)
                prompt = 16 if engine == "moe-local" else 0  # moe-local bench needs a prompt
                for k in range(start.get((engine, w, cap), 0), len(settings)):
                    spec = RunSpec(
                        engine,
                        w,
                        models[w][engine],
                        a.cap_threads,
                        prompt,
                        a.cap_new_tokens,
                        cap,
                        settings[k],
                    )
                    dropped = drop_page_cache()
                    r = run_once(spec, rep, llama_bench)
                    r.extra["page_cache_dropped"] = dropped
                    runs.append(r)
                    if r.ok:
                        start[(engine, w, cap)] = k
                        break
    notes = []
    if not all(r.extra.get("page_cache_dropped", True) for r in runs):
        notes.append("The page cache could not be dropped before some capped runs (not permitted).")
    return runs, notes


def build_report(a, argv, llama, sizes, models, runs, capped, cap_notes, phases, started, floor) -> list[str]:
    """The report's sections, in order."""
    m = report.machine()
    info = next((r.extra for r in runs if r.spec["engine"] == "llama.cpp" and r.extra), {})
    build = ""  # an sdist has no git: llama-bench then says build 0, commit "unknown"
    if info.get("build_commit") not in (None, "unknown"):
        build = f" (build {info.get('build_number')}, commit {info['build_commit']})"
    cmdline = "python benchmarks/bench_llamacpp.py" + ("" if not argv else " " + " ".join(argv))
    out = [
        "# moe-local against llama.cpp, same weights (`bench_llamacpp.py`)",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC, `{cmdline}`, on {m['cpu']} ({m['cores']} cores, {m['ram']} RAM, "
        f"Linux {m['kernel']}, Python {m['python']}), no GPU. Other work shared the machine: the load "
        "average at each run's start is in the raw table. llama.cpp: the `vendor/llama.cpp` sources "
        f"of the llama-cpp-python {llama.version} sdist{build}, "
        f"`cmake {' '.join(CMAKE_FLAGS)}`, targets llama-bench and llama-quantize; llama-bench reports "
        f"the CPU as {info.get('cpu_info', '?')!r}.",
        "",
        "Ratio = moe-local / llama.cpp: above 1 moe-local is faster (for peak RSS: uses more). "
        f"Medians over {a.reps} alternating round(s); the engines' order flips every round.",
        "",
        "## Checkpoints",
        "",
        "| workload | engine | model | dense MiB | experts MiB |",
        "|---|---|---|---|---|",
    ]
    for w in a.workloads:
        for e in ENGINES:
            d, x = sizes[w][e]
            out.append(f"| {w} | {e} | `{models[w][e]}` | {d / MIB:.0f} | {x / MIB:.0f} |")
    if floor:
        out += [
            "",
            f"A Python that only imports torch and moe-local's loader peaks at {floor / MIB:.0f} MiB RSS "
            "(`python -c 'import torch, moe_local.bench, moe_local.loading.loader'`): moe-local's floor "
            "before any weight, which a memory cap charges too.",
        ]
    out += ["", "## Side by side (uncapped)", "", *report.side_by_side(runs, a.workloads, a.threads), ""]
    out += ["## Under a memory cap (cgroup v1, page cache charged)", ""]
    if capped:
        out += [
            f"Decode of {a.cap_new_tokens} tokens with {a.cap_threads} thread(s) (moe-local after a 16-token "
            "prompt), page cache dropped before each run, each child in a fresh cgroup. `auto` cap = the "
            f"larger engine's dense part + {a.cap_fraction:.0%} of its experts; the second adds moe-local's "
            "512 MiB runtime allowance. Each engine tries its settings in order until one runs: "
            "llama.cpp mmap'd (`-lm mmap`), then also without CPU repacking (`--repack 0`: by default "
            "Q4_0 is copied into anonymous interleaved buffers, which the kernel cannot reclaim); "
            "moe-local told the cap (`--cpu-memory`), for bf16 then with `--dtype bfloat16` said "
            "explicitly (its CPU default where the native kernel runs), then given the cap's share of "
            "experts (`--expert-memory`).",
            "",
            *report.capped(capped),
            "",
        ]
    out += [f"- {n}" for n in cap_notes] + ([""] if cap_notes else [])
    out += ["## Commands", "", f"`{cmdline}` ran, for each round, thread count and workload:", ""]
    seen: list[str] = []
    for r in runs + capped:
        if r.command not in seen:
            seen.append(r.command)
    out += [f"    {c}" for c in seen] + [""]
    out += ["## Phase times", "", "| phase | seconds |", "|---|---|"]
    out += [f"| {n} | {t:.0f} |" for n, t in phases.times] + [""]
    out += ["## Raw runs", "", *report.raw_rows(runs + capped), ""]
    out += [
        "## Method notes",
        "",
        "- Both engines' decode is timed after the prompt: moe-local's follows its prompt, "
        "llama.cpp's `tg` test runs at the prompt's depth (`-d 0,P`: pp from an empty context, tg at "
        "depth P). From an empty context llama.cpp decodes about 14% faster on the 1.6 GB model.",
        "- moe-local's prefill speed is prompt tokens / time to the first token (one 512-token "
        "forward and one sampling step); llama-bench's is its `pp` test.",
        "- The GGUF is converted through a view of the folder that adds `architectures` to "
        "config.json and one BPE merge to the byte tokenizer, and the converter's unknown "
        "pre-tokenizer hash is answered with `gpt-2` (`benchmarks/llamacpp/gguf_convert.py`); the "
        "weights are untouched and both engines get random token ids.",
        "- Q4_0 and all-4bit make the same choices but for two tensors: both store experts and "
        "q/o attention in 4 bits and k/v attention in 8; the output matrix is Q6_K in llama.cpp and "
        "int8-g128 in moe-local (its CPU kernel has no 6-bit codes: 34 MB against 27 MB read per "
        "token), and llama.cpp also quantizes the embedding table (read one row a token).",
    ]
    return out


def main(argv: list[str] | None = None) -> None:
    """Build, make checkpoints, run both engines, write the report."""
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    phases = Phases()
    with phases("python packages"):
        ensure_python_deps()
    with phases("llama.cpp (find or build)"):
        llama = ensure_llamacpp(default_root(a.cache), jobs=a.jobs)
    ck = ensure_checkpoints(checkpoints_root(a.cache, a.shape), llama, shape=a.shape, timer=phases)
    models = {
        "bf16": {"llama.cpp": ck.bf16_gguf, "moe-local": ck.hf},
        "4-bit": {"llama.cpp": ck.q4_gguf, "moe-local": ck.ml_4bit},
    }
    with phases("sizes"):
        sizes = {
            w: {
                "llama.cpp": gguf_sizes(models[w]["llama.cpp"], llama),
                "moe-local": moe_local_sizes(models[w]["moe-local"]),
            }
            for w in a.workloads
        }
        floor = runtime_floor_rss()
    llama_bench = llama.tool("llama-bench")
    with phases("uncapped runs"):
        runs = uncapped_runs(a, models, llama_bench)
    with phases("capped runs"):
        capped, cap_notes = capped_runs(a, models, sizes, llama_bench)
    raw = {
        "started": started.isoformat(),
        "argv": argv,
        "sizes": sizes,
        "runtime_floor_rss": floor,
        "runs": [asdict(r) for r in runs + capped],
    }
    (a.cache / "last-run.json").write_text(json.dumps(raw, indent=1, default=str))
    phases.times.append(("total", sum(t for _, t in phases.times)))
    sections = build_report(a, argv, llama, sizes, models, runs, capped, cap_notes, phases, started, floor)
    a.md.parent.mkdir(parents=True, exist_ok=True)
    report.write_report(a.md, sections)
    print(f"wrote {a.md}")
    print("\n".join(report.side_by_side(runs, a.workloads, a.threads)))
    if capped:
        print("\n".join(report.capped(capped)))


if __name__ == "__main__":
    main()
