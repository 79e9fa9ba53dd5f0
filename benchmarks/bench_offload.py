"""Benchmark expert offload: moe-local's expert cache against transformers + accelerate disk offload.

On a Mixtral-shaped bf16 checkpoint (hidden 1024, expert FFN 3584, 8 layers, 8 experts, top-2,
about 1.6 GB; written with ``benchmarks/synth_hf.py`` under /tmp when missing) and one RAM budget
(default 700 MiB, which leaves moe-local's experts at most 40% of all experts' bytes), in one run:

a. transformers + accelerate: ``from_pretrained(device_map="auto", max_memory={"cpu": BUDGET},
   offload_folder=DIR)``, in bf16 and fp32 (bf16 matmuls with one token are slow on some CPUs).
b. moe-local on the same checkpoint with ``expert_memory = BUDGET - dense bytes``: lru/lfu x
   prefetch on/off in bf16, the default (lru + prefetch) in fp32; and on an int4-g64 rtn copy
   (``quantize_checkpoint``) with the same budget and with 40% of its own experts' bytes.
c. everything resident (moe-local and plain transformers, per dtype): the compute floor; cold-read
   disk bandwidth; floor = bytes read per token / bandwidth + resident time per token.
d. routing traces of the budgeted moe-local runs replayed through LRU, LFU and Belady's optimum at
   the same slot count, next to the hit rate the cache measured.

Every measurement is a fresh child process (``benchmarks/offload/child.py``) that drops the
checkpoint, the offload folder and moe-local's files from the page cache before every forward pass
(so the page cache cannot serve "disk" reads from this machine's 24 GiB), with torch threads = 2 and
a greedy decode after a short prompt. Rounds alternate baseline and moe-local; each number is the
median over rounds. Results go to ``--json`` and the tables to ``--md``; anything below the line
``<!-- notes -->`` of an existing ``--md`` file is kept.

Usage::

    python benchmarks/bench_offload.py                          # everything, 3 rounds (about an hour)
    python benchmarks/bench_offload.py --runs 1 --only ml-bf16-lru-pf,hf-offload-bf16
    python benchmarks/bench_offload.py --profile ml-bf16-lru-pf # cProfile of one moe-local run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from offload.diskbw import cold_read_bandwidth  # noqa: E402
from offload.policies import simulate_layer_distance  # noqa: E402
from offload.sysio import machine_info, wait_quiet  # noqa: E402

ROOT = Path(tempfile.gettempdir()) / "moe-offload"
DEFAULT_SRC = ROOT / "synth-mixtral"
INT4_RECIPE = HERE / "offload" / "experts-int4-g64-rtn.toml"
MIB = 2**20
PROMPT = "The quick brown fox jumps over the lazy dog."
TARGET_SPEEDUP = 20.0
TARGET_FLOOR_RATIO = 1.3
TARGET_BELADY_FRACTION = 0.9
MAX_EXPERT_FRACTION = 0.4
RUN_ID = time.strftime("%Y%m%d-%H%M%S")  # names this invocation's trace files
QUIET_CORES = 0.25  # a run is "quiet" when other processes used at most this many cores meanwhile
NOTES_MARK = "<!-- notes -->"
_ELEM = {"bfloat16": 2, "float32": 4}


# ------------------------------------------------------------------------------------------- model facts


@dataclass(frozen=True)
class ModelFacts:
    """Byte counts of the HF checkpoint and its int4 copy that set the budgets."""

    experts: int
    expert_bytes_bf16: int  # one expert in the checkpoint (bf16)
    dense_bytes_bf16: int  # everything else in the checkpoint
    int4_expert_bytes: int  # one expert blob of the int4 copy
    int4_dense_bytes: int  # dense.safetensors of the int4 copy (kept in bf16)

    @property
    def all_experts_bf16(self) -> int:
        """Bytes of all experts in the checkpoint."""
        return self.experts * self.expert_bytes_bf16

    def dense(self, dtype: str) -> int:
        """Dense bytes once loaded in ``dtype``."""
        return self.dense_bytes_bf16 * _ELEM[dtype] // 2

    def expert(self, dtype: str) -> int:
        """One expert's bytes once loaded in ``dtype``."""
        return self.expert_bytes_bf16 * _ELEM[dtype] // 2


def model_facts(src: Path, int4: Path) -> ModelFacts:
    """Read the byte counts from the index, the config and the int4 manifest."""
    from moe_local.format.safetensors_io import SafetensorsFile

    cfg = json.loads((src / "config.json").read_text())
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    experts = cfg["num_hidden_layers"] * cfg["num_local_experts"]
    total = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    expert = 3 * h * f * 2
    manifest = json.loads((int4 / "moe_local.json").read_text())
    blob = int(next(iter(manifest["layers"].values()))["experts"][0][1])
    dense4 = sum(t.nbytes for t in SafetensorsFile(int4 / "dense.safetensors").tensors.values())
    return ModelFacts(experts, expert, total - experts * expert, blob, dense4)


def ensure_checkpoints(src: Path, int4: Path) -> dict:
    """Write the synthetic checkpoint and its int4 copy when missing; return what was done."""
    done = {}
    if not (src / "model.safetensors.index.json").exists():
        from synth_hf import write_synthetic_mixtral

        t0 = time.perf_counter()
        write_synthetic_mixtral(src, verbose=True)
        done["synth_s"] = time.perf_counter() - t0
    if not (int4 / "moe_local.json").exists():
        from moe_local.convert.writer import quantize_checkpoint
        from moe_local.recipes import load_recipe

        t0 = time.perf_counter()
        quantize_checkpoint(src, int4, load_recipe(str(INT4_RECIPE)), overwrite=True)
        done["quantize_s"] = time.perf_counter() - t0
    return done


def prompt_ids(src: Path) -> list[int]:
    """The prompt's token ids with the checkpoint's tokenizer (no chat template)."""
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(src).encode(PROMPT))


def package_fingerprint() -> str:
    """A short hash of moe_local's sources: the package is edited while benchmarks run."""
    import moe_local

    h = hashlib.sha256()
    for p in sorted(Path(moe_local.__file__).parent.rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------------- configs


@dataclass
class Config:
    """One measurement: engine, model, dtype, budget and cache options."""

    name: str
    group: str  # baseline | moe-local | int4 | resident
    engine: str  # hf | ml
    model: Path
    dtype: str
    budget: int | None = None  # hf: max_memory["cpu"]
    expert_memory: int | None = None  # ml
    prefetch: bool = True
    policy: str = "lru"
    trace: bool = False
    evict: list[Path] = field(default_factory=list)
    note: str = ""
    temperature: float = 0.0  # ml only: 0 = greedy


def make_configs(src: Path, int4: Path, budget: int, facts: ModelFacts, work: Path) -> list[Config]:
    """All measurements, in the order a round runs them (baseline and moe-local alternate)."""
    off = work / "offload-folder"
    hf_evict = [src, off]
    ml_mem = {d: budget - facts.dense(d) for d in _ELEM}
    int4_mem = budget - facts.int4_dense_bytes
    int4_40 = int(MAX_EXPERT_FRACTION * facts.experts * facts.int4_expert_bytes)
    cfgs = [
        Config("hf-offload-bf16", "baseline", "hf", src, "bfloat16", budget=budget, evict=hf_evict),
        Config("ml-bf16-lru-pf", "moe-local", "ml", src, "bfloat16", None, ml_mem["bfloat16"], True, "lru"),
        Config("hf-offload-fp32", "baseline", "hf", src, "float32", budget=budget, evict=hf_evict),
        Config("ml-fp32-lru-pf", "moe-local", "ml", src, "float32", None, ml_mem["float32"], True, "lru"),
        Config("ml-bf16-lru", "moe-local", "ml", src, "bfloat16", None, ml_mem["bfloat16"], False, "lru"),
        Config("ml-bf16-lfu-pf", "moe-local", "ml", src, "bfloat16", None, ml_mem["bfloat16"], True, "lfu"),
        Config("ml-bf16-lfu", "moe-local", "ml", src, "bfloat16", None, ml_mem["bfloat16"], False, "lfu"),
        Config(
            "ml-bf16-lru-pf-sampled",
            "sampled",
            "ml",
            src,
            "bfloat16",
            None,
            ml_mem["bfloat16"],
            True,
            "lru",
            note="temperature 1.0, seed 0: the greedy decode of random weights repeats a few tokens, "
            "sampling does not, so its routing is closer to uniform",
            temperature=1.0,
        ),
        Config("ml-int4-lru-pf", "int4", "ml", int4, "bfloat16", None, int4_mem, True, "lru"),
        Config(
            "ml-int4-40pct-lru-pf",
            "int4",
            "ml",
            int4,
            "bfloat16",
            None,
            int4_40,
            True,
            "lru",
            note="experts budget = 40% of the int4 experts' bytes",
        ),
        Config("hf-ram-bf16", "resident", "hf", src, "bfloat16"),
        Config("ml-ram-bf16", "resident", "ml", src, "bfloat16"),
        Config("hf-ram-fp32", "resident", "hf", src, "float32"),
        Config("ml-ram-fp32", "resident", "ml", src, "float32"),
        Config("ml-ram-int4", "resident", "ml", int4, "bfloat16"),
    ]
    for c in cfgs:
        if c.engine == "ml":
            c.evict = [c.model]
            c.trace = c.expert_memory is not None
    return cfgs


# ------------------------------------------------------------------------------------------- running


def run_child(
    cfg: Config,
    args,
    prompt: list[int],
    work: Path,
    round_no: int,
    profile: Path | None = None,
    pyspy: Path | None = None,
):
    """Run one measurement in a fresh process; return its result dict (or an ``error``)."""
    trace = work / f"trace-{cfg.name}-{RUN_ID}-r{round_no}.jsonl" if cfg.trace else None
    spec = {
        "engine": cfg.engine,
        "model": str(cfg.model),
        "dtype": cfg.dtype,
        "budget": cfg.budget,
        "offload_dir": str(work / "offload-folder") if cfg.budget else None,
        "expert_memory": cfg.expert_memory,
        "prefetch": cfg.prefetch,
        "policy": cfg.policy,
        "evict": [str(p) for p in cfg.evict],
        "prompt_ids": prompt,
        "new_tokens": args.tokens,
        "warmup_tokens": args.warmup,
        "threads": args.threads,
        "trace": str(trace) if trace else None,
        "profile": str(profile) if profile else None,
        "pyspy": str(pyspy) if pyspy else None,
        "temperature": cfg.temperature,
    }
    if cfg.budget:
        shutil.rmtree(work / "offload-folder", ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MOE_LOCAL_THREADS=str(args.threads))
    env["PYTHONWARNINGS"] = "ignore"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(HERE / "offload" / "child.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}", "stderr_tail": tail, "wall_s": wall}
    res = json.loads(line[len("RESULT ") :])
    res["wall_s"] = wall
    if trace is not None:
        res["trace_file"] = str(trace)
    if cfg.budget:
        shutil.rmtree(work / "offload-folder", ignore_errors=True)
    return res


def measure_disk(src: Path, chunk: int) -> dict:
    """Cold-read bandwidth of the checkpoint's disk: expert-sized random reads (buffered and O_DIRECT)
    and 64 MiB reads (buffered), each after dropping the shards from the page cache."""
    shards = sorted(src.glob("*.safetensors"))
    out = {}
    for name, size, direct in (
        ("buffered", chunk, False),
        ("direct", chunk, True),
        ("large", 64 * MIB, False),
    ):
        try:
            out[name] = cold_read_bandwidth(shards, size, 440 * 10**6, direct=direct)
        except OSError as exc:  # O_DIRECT is not supported on every filesystem
            out[name] = {"error": str(exc)}
    return out


def run_components(args) -> list[dict]:
    """Run ``offload/components.py`` with 1 thread and with ``--threads``; return its results."""
    out = []
    for threads in sorted({1, args.threads}):
        proc = subprocess.run(
            [
                sys.executable,
                str(HERE / "offload" / "components.py"),
                str(args.src),
                str(args.int4),
                str(threads),
            ],
            capture_output=True,
            text=True,
            check=False,
            env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            out.append({"threads": threads, "error": (proc.stderr or "").strip().splitlines()[-3:]})
        else:
            out.append(json.loads(line[len("RESULT ") :]))
    return out


def profile_runs(args, prompt: list[int], work: Path, cfgs: list[Config]) -> None:
    """``--profile``: cProfile of one run; ``--py-spy``: sampled profiles of several runs, as markdown."""
    by_name = {c.name: c for c in cfgs}
    if args.profile:
        out = work / f"profile-{args.profile}.prof"
        res = run_child(by_name[args.profile], args, prompt, work, 0, profile=out)
        print(json.dumps({k: v for k, v in res.items() if k not in ("tokens", "device_map")}, indent=1))
        import pstats

        pstats.Stats(str(out)).sort_stats("tottime").print_stats(30)
    if not args.py_spy:
        return
    from offload import spy

    lines = [
        f"py-spy profiles ({args.tokens} new tokens, {args.warmup} warm-up; 100 Hz, idle samples kept)\n"
    ]
    for name in args.py_spy.split(","):
        raw = work / f"spy-{name}.txt"
        res = run_child(by_name[name], args, prompt, work, 0, pyspy=raw)
        if "error" in res:
            lines.append(f"### `{name}`: failed: {res['error']}\n")
            continue
        lines.append(f"### `{name}`\n")
        stats = res.get("stats_decode") or {}
        lines.append(
            f"decode {res['decode_tps']:.2f} tok/s ({res['ms_per_token']:.0f} ms/token), "
            f"disk {res['read_bytes_per_token'] / 1e6:.1f} MB/token, "
            f"others' cores {res['others_cores']:.2f}, "
            f"decode steps ms {res['step_ms'][1:]}, decode stats {stats}\n"
        )
        lines += spy.render(spy.summarize(raw), args.tokens)
        lines.append("")
        print("\n".join(lines[-40:]), flush=True)
    args.spy_md.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------- analysis


def med(values: list[float]) -> float:
    """Median (0 for none)."""
    return statistics.median(values) if values else 0.0


def summarize(cfg: Config, runs: list[dict]) -> dict:
    """Medians (and min, max) over the successful runs of one config."""
    ok = [r for r in runs if "error" not in r]
    s: dict[str, object] = {"runs": len(ok), "errors": [r for r in runs if "error" in r][:1]}
    if not ok:
        return s
    for key in (
        "decode_tps",
        "ms_per_token",
        "read_bytes_per_token",
        "evict_ms_per_step",
        "rss_peak_decode_mib",
        "rss_end_mib",
        "load_s",
        "prefill_s",
        "others_cores",
        "median_step_ms",
        "cache_after_evict_bytes",
    ):
        vals = [float(r[key]) for r in ok if r.get(key) is not None]
        s[key] = med(vals)
        s[key + "_min"] = min(vals) if vals else 0.0
        s[key + "_max"] = max(vals) if vals else 0.0
    quiet = [r for r in ok if r["others_cores"] <= QUIET_CORES]
    s["quiet"] = {"runs": len(quiet)}
    for key in ("decode_tps", "ms_per_token", "median_step_ms", "read_bytes_per_token", "others_cores"):
        s["quiet"][key] = med([float(r[key]) for r in quiet])
    s["cache_left_bytes"] = med([r["cache_left_bytes"] for r in ok if r.get("cache_left_bytes") is not None])
    s["tokens"] = ok[0]["tokens"]
    for key in ("disk_modules", "offload_bytes", "dense_bytes", "num_experts"):
        if key in ok[0]:
            s[key] = ok[0][key]
    if cfg.engine == "ml" and cfg.expert_memory is not None:
        n = ok[0]["decode_passes"]
        dec = [r["stats_decode"] for r in ok]
        s["hit_rate_decode"] = med([_hit(d) for d in dec])
        s["hit_rate_all"] = med([_hit(r["stats_all"]) for r in ok])
        s["prefetch_used_per_token"] = med([d["prefetch_used"] / n for d in dec])
        s["prefetched_per_token"] = med([d["prefetched"] / n for d in dec])
        s["misses_per_token"] = med([d["misses"] / n for d in dec])
        s["io_wait_ms_per_token"] = med([1e3 * d["io_wait_s"] / n for d in dec])
        s["stats_bytes_per_token"] = med([d["bytes_from_disk"] / n for d in dec])
        s["bytes_per_resident_expert"] = med([r["bytes_per_resident_expert"] for r in ok])
        s["resident_experts"] = med([r["resident_experts"] for r in ok])
        s["replay"] = [rp for rp in (r.get("replay") or replay(r, cfg) for r in ok) if rp]
        if s["replay"]:
            s["replay_median"] = {k: med([r[k] for r in s["replay"]]) for k in REPLAY_COLUMNS}
            s["replay_median"]["slots"] = s["replay"][0]["slots"]
    return s


REPLAY_COLUMNS = ("uses", "lru", "lfu", "layer_distance", "belady", "measured", "measured_demand")


def _hit(d: dict) -> float:
    n = d["hits"] + d["misses"]
    return d["hits"] / n if n else 0.0


def replay(result: dict, cfg: Config) -> dict | None:
    """Replay a run's trace through LRU, LFU and Belady at the cache's slot count (None: no trace)."""
    from moe_local.errors import MoeLocalError
    from moe_local.experts.policy import simulate
    from moe_local.experts.trace import read_trace

    if not result.get("trace_file") or cfg.expert_memory is None:
        return None
    try:
        keys = read_trace(result["trace_file"])
    except MoeLocalError:
        return None
    per = result["bytes_per_resident_expert"] or 1
    slots = max(1, int(cfg.expert_memory // per))
    out = {"slots": slots, "uses": len(keys), "measured": _hit(result["stats_all"])}
    for pol in ("lru", "lfu", "belady"):
        hits, _ = simulate(keys, slots, pol)
        out[pol] = hits / len(keys)
    out["layer_distance"] = simulate_layer_distance(keys, slots)[0] / len(keys)
    st = result["stats_all"]
    out["measured_demand"] = (st["hits"] - st["prefetch_used"]) / len(keys)
    measured_uses = result["stats_all"]["hits"] + result["stats_all"]["misses"]
    out["trace_matches_stats"] = measured_uses == len(keys)
    return out


# ------------------------------------------------------------------------------------------- report


def fmt_mb(b: float) -> str:
    """Bytes as MB (1e6) with one decimal."""
    return f"{b / 1e6:.1f}"


def _range(s: dict, key: str, digits: int = 2) -> str:
    return f"{s[key]:.{digits}f} ({s[key + '_min']:.{digits}f}–{s[key + '_max']:.{digits}f})"


def render(data: dict) -> str:
    """The markdown tables of a finished run."""
    m, a = data["machine"], data["args"]
    facts = data["facts"]
    S = data["summary"]
    cfgs = {c["name"]: c for c in data["configs"]}
    L = []
    L.append("# Offload benchmark: moe-local expert cache vs transformers + accelerate disk offload\n")
    L.append(
        f"Generated by `benchmarks/bench_offload.py` on {m['date']} "
        f"(moe_local sources {data['fingerprint']}).\n"
    )
    L.append("## Machine\n")
    L.append(f"- CPU: {m['cpu']}, {m['cores']} cores; RAM {m['ram_gib']} GiB; disk {m['disk']}")
    L.append(
        f"- kernel {m['kernel']}, Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, "
        f"accelerate {m['accelerate']}"
    )
    L.append(
        f"- torch threads {a['threads']}; other processes used {data['others_cores_median']:.2f} cores "
        "on average during the measured decodes (shared machine; per-config numbers below)\n"
    )
    L.append("## Command\n")
    L.append(f"```\n{data['command']}\n```\n")
    L.append(
        f"Model: `{a['src']}`, Mixtral-shaped bf16 (hidden 1024, FFN 3584, 8 layers, 8 experts, top-2), "
        f"{fmt_mb(facts['dense_bytes_bf16'] + facts['experts'] * facts['expert_bytes_bf16'])} MB: "
        f"dense {fmt_mb(facts['dense_bytes_bf16'])} MB, {facts['experts']} experts of "
        f"{fmt_mb(facts['expert_bytes_bf16'])} MB. int4 copy: `{a['int4']}` (experts int4-g64 rtn, "
        f"{fmt_mb(facts['int4_expert_bytes'])} MB per expert blob; dense kept, "
        f"{fmt_mb(facts['int4_dense_bytes'])} MB)."
    )
    L.append(
        f"Budget {a['budget_mib']} MiB ({fmt_mb(a['budget_mib'] * MIB)} MB) for each engine. "
        f"Greedy decode of {a['tokens']} new tokens after a {data['prompt_len']}-token prompt "
        f"({a['warmup']} warm-up tokens first, "
        f"same process); {a['runs']} rounds, baseline and moe-local alternating; medians (min–max). "
        "Decode time excludes the page cache eviction the pre-forward hook does before every pass "
        "(its cost is listed).\n"
    )

    def row_common(name: str) -> list[str]:
        s = S[name]
        if not s.get("runs"):
            return [f"`{name}`", "failed", *[""] * (len(head) - 2)]
        return [
            f"`{name}`",
            _range(s, "decode_tps"),
            f"{s['ms_per_token']:.0f}",
            f"{s['median_step_ms']:.0f} / {s['median_step_ms_min']:.0f}",
            fmt_mb(s["read_bytes_per_token"]),
            fmt_mb(s.get("cache_after_evict_bytes") or 0),
            f"{s['evict_ms_per_step']:.1f}",
            f"{s['rss_peak_decode_mib']:.0f}",
            f"{s['others_cores']:.2f}",
        ]

    head = [
        "config",
        "decode tok/s median (min–max)",
        "ms/token",
        "median forward ms: all runs / best run",
        "disk read MB/token",
        "page cache after evict MB",
        "evict ms/step",
        "peak RSS MiB (decode)",
        "others' cores",
    ]

    def table(rows: list[list[str]], header: list[str]) -> None:
        L.append("| " + " | ".join(header) + " |")
        L.append("|" + "---|" * len(header))
        for r in rows:
            L.append("| " + " | ".join(r) + " |")
        L.append("")

    L.append(
        "Columns: decode tok/s = decode passes / (first decode pass start to last pass end, eviction "
        "hook excluded); median forward ms = median duration of one decode forward pass (robust to bursts "
        "of other processes), median over runs and in the least disturbed run; disk read = "
        "`/proc/self/io` read_bytes over the decode / decode tokens; page cache after evict = bytes of "
        "the evicted files still cached right after the eviction before the "
        "first decode pass (`fincore`); others' cores = CPU used by other processes during the decode.\n"
    )
    L.append("## a. transformers + accelerate disk offload (baseline)\n")
    table([row_common(n) for n in S if cfgs[n]["group"] == "baseline"], head)
    for n in S:
        if cfgs[n]["group"] == "baseline" and S[n].get("runs"):
            mods = S[n].get("disk_modules", [])
            L.append(
                f"- `{n}`: {len(mods)} modules on disk ({', '.join(mods)}); offload folder "
                f"{fmt_mb(S[n].get('offload_bytes', 0))} MB (re-saved fused experts), the rest read from "
                "the checkpoint's shards"
            )
    L.append("")

    def ml_rows(group: str) -> list[list[str]]:
        rows = []
        for n in S:
            c = cfgs[n]
            if c["group"] != group:
                continue
            s = S[n]
            r = row_common(n)
            if s.get("runs"):
                r += [
                    fmt_mb(c["expert_memory"]),
                    f"{s['resident_experts']:.0f} of {s.get('num_experts', 64)}",
                    f"{100 * s['hit_rate_decode']:.1f}",
                    f"{s['misses_per_token']:.2f} / {s['prefetched_per_token']:.2f} / "
                    f"{s['prefetch_used_per_token']:.2f}",
                    f"{s['io_wait_ms_per_token']:.0f}",
                    fmt_mb(s["stats_bytes_per_token"]),
                ]
            rows.append(r)
        return rows

    ml_head = [
        *head,
        "expert_memory MB",
        "experts resident at end",
        "hit % (decode)",
        "misses / prefetched / prefetch used per token",
        "I/O wait ms/token",
        "stats bytes_from_disk MB/token",
    ]
    L.append("## b. moe-local on the same checkpoint and budget\n")
    table(ml_rows("moe-local"), ml_head)
    L.append("### b'. moe-local, same as the default, sampling instead of greedy\n")
    table(ml_rows("sampled"), ml_head)
    L.append("### b''. moe-local on the int4-g64 (rtn) copy (different precision: not comparable 1:1)\n")
    table(ml_rows("int4"), ml_head)
    for n in S:
        if cfgs[n]["note"]:
            L.append(f"- `{n}`: {cfgs[n]['note']}")
    L.append("")

    L.append("## c. all resident (compute floor), disk bandwidth, floor ratio\n")
    table([row_common(n) for n in S if cfgs[n]["group"] == "resident"], head)
    d = data["disk"]

    def runs(xs: list[float]) -> str:
        return ", ".join(f"{x:.3f}" for x in xs)

    L.append(
        f"Cold-read bandwidth of the checkpoint's disk after eviction, one thread, one `preadv` per read, "
        f"once per round: random {fmt_mb(facts['expert_bytes_bf16'])} MB reads buffered "
        f"{d['buffered_gbps']:.3f} GB/s (runs {runs(d['buffered_all'])}), the same with O_DIRECT "
        f"{d['direct_gbps']:.3f} GB/s (runs {runs(d['direct_all'])}), 64 MiB reads buffered "
        f"{d['large_gbps']:.3f} GB/s (runs {runs(d['large_all'])}). The floor uses the better "
        f"expert-sized figure, {d['floor_gbps']:.3f} GB/s.\n"
    )
    L.append(
        "Floor = disk MB/token / bandwidth + all-resident time per token of the same precision. Two "
        "readings: by mean decode time (ms/token) and by median forward pass (robust to other processes); "
        f"over all runs and over the quiet runs only (other processes below {QUIET_CORES} cores).\n"
    )
    table(
        [
            [
                f"`{f['name']}`",
                f["view"],
                f"{f['ms']:.0f}",
                fmt_mb(f["bytes"]),
                f"{f['disk_ms']:.0f}",
                f"{f['resident_ms']:.0f} (`{f['resident']}`)",
                f"{f['floor_ms']:.0f}",
                f"{f['ratio']:.2f}",
                f"{f['median_ms']:.0f} / {f['floor_median_ms']:.0f} = {f['ratio_median']:.2f}",
            ]
            for f in data["floors"]
        ],
        [
            "config",
            "runs",
            "ms/token",
            "disk MB/token",
            "disk ms/token at bw",
            "resident ms/token (config)",
            "floor ms/token",
            "ms / floor",
            "median forward ms / floor (median based)",
        ],
    )

    L.append("## d. routing-trace hit rates\n")
    L.append(
        "Whole trace of each budgeted run (warm-up + measured generation, from load; prefill counts each "
        "layer's distinct experts once), replayed at the cache's slot count (expert_memory / bytes per "
        "resident expert; int4 experts carry their kernel-layout copy). Medians over rounds. `layer-dist` "
        "is a benchmark-side online policy (evict the expert whose layer comes up last; see "
        "`benchmarks/offload/policies.py`). measured = hits / uses of the cache, prefetched-and-used counted "
        "as hits; demand-only = hits that were resident without a prefetch.\n"
    )
    cols = ["uses", "lru", "lfu", "layer_distance", "belady", "measured", "measured_demand"]
    rows = []
    for n in S:
        rm = S[n].get("replay_median")
        if not rm:
            continue
        rows.append(
            [f"`{n}`", str(rm["slots"]), f"{rm['uses']:.0f}"]
            + [f"{100 * rm[c]:.1f}" for c in cols[1:]]
            + [f"{rm['measured'] / rm['belady'] if rm['belady'] else 0:.2f}"]
            + [str(all(r["trace_matches_stats"] for r in S[n]["replay"]))]
        )
    table(
        rows,
        [
            "config",
            "slots",
            "expert uses",
            "LRU %",
            "LFU %",
            "layer-dist %",
            "Belady %",
            "measured %",
            "measured demand-only %",
            "measured / Belady",
            "trace uses = cache requests",
        ],
    )

    L.append(f"## Quiet runs only (other processes used at most {QUIET_CORES} cores during the decode)\n")
    L.append(
        "This machine is shared: other processes kept both cores busy most of the time, and with 2 torch "
        "threads an OpenMP region then waits for a descheduled thread (section e). Medians over the runs "
        "that found the machine quiet:\n"
    )
    qrows = []
    for n in S:
        q = (S[n].get("quiet") or {}) if S[n].get("runs") else {}
        if q.get("runs"):
            qrows.append(
                [
                    f"`{n}`",
                    f"{q['runs']} of {S[n]['runs']}",
                    f"{q['decode_tps']:.2f}",
                    f"{q['ms_per_token']:.0f}",
                    f"{q['median_step_ms']:.0f}",
                    fmt_mb(q["read_bytes_per_token"]),
                    f"{q['others_cores']:.2f}",
                ]
            )
        else:
            qrows.append([f"`{n}`", f"0 of {S[n].get('runs', 0)}", "", "", "", "", ""])
    table(
        qrows,
        [
            "config",
            "quiet runs",
            "decode tok/s",
            "ms/token",
            "median forward ms",
            "disk MB/token",
            "others' cores",
        ],
    )
    comp = data.get("components") or []
    if comp:
        L.append("## e. component costs (ms, median of repetitions; `benchmarks/offload/components.py`)\n")
        L.append(
            "Microbenchmarks of the pieces of moe-local's decode path, with 1 thread and with the run's "
            "thread count. Compute reuses one expert's weights, so they sit in the CPU caches: "
            "a lower bound.\n"
        )
        keys = [k for k in comp[0] if k != "threads" and not k.startswith("error")]
        table(
            [[k] + [f"{c.get(k, float('nan')):.3f}" for c in comp] for k in keys],
            ["piece", *[f"threads={c['threads']}" for c in comp]],
        )
    L.append("## Targets\n")
    table(
        [[t["target"], t["measured"], t["verdict"]] for t in data["targets"]],
        ["target", "measured", "verdict"],
    )
    L.append("## Output agreement (greedy tokens, measured run)\n")
    for line in data["agreement"]:
        L.append(f"- {line}")
    L.append("")
    return "\n".join(L)


def agreement(S: dict) -> list[str]:
    """How many leading greedy tokens each run shares with the resident run of its engine and dtype."""
    out = []
    pairs = [
        ("hf-ram-bf16", "ml-ram-bf16"),
        ("hf-ram-fp32", "ml-ram-fp32"),
        ("hf-ram-bf16", "hf-offload-bf16"),
        ("hf-ram-fp32", "hf-offload-fp32"),
        ("ml-ram-bf16", "ml-bf16-lru-pf"),
        ("ml-ram-fp32", "ml-fp32-lru-pf"),
        ("ml-ram-int4", "ml-int4-lru-pf"),
    ]
    for x, y in pairs:
        if S.get(x, {}).get("tokens") and S.get(y, {}).get("tokens"):
            tx, ty = S[x]["tokens"], S[y]["tokens"]
            same = next(
                (i for i, (p, q) in enumerate(zip(tx, ty, strict=False)) if p != q), min(len(tx), len(ty))
            )
            out.append(f"`{x}` vs `{y}`: first {same} of {len(tx)} tokens equal")
    return out


def _view(S: dict, name: str, view: str) -> dict | None:
    """A config's summary for ``view`` ("all" runs or "quiet" runs), None when it has no such runs."""
    s = S.get(name) or {}
    if not s.get("runs"):
        return None
    if view == "all":
        return s
    q = s.get("quiet") or {}
    return q if q.get("runs") else None


def floors_for(S: dict, cfgs: dict, disk_bw: float, view: str) -> list[dict]:
    """Each budgeted moe-local config's floor: disk bytes / bandwidth + resident time, in one view."""
    floors = []
    resident_of = {"bfloat16": "ml-ram-bf16", "float32": "ml-ram-fp32"}
    for n in S:
        c = cfgs[n]
        s = _view(S, n, view)
        if c["engine"] != "ml" or c["expert_memory"] is None or s is None:
            continue
        res = "ml-ram-int4" if c["group"] == "int4" else resident_of[c["dtype"]]
        r = _view(S, res, view)
        if r is None:
            continue
        disk_ms = 1e3 * s["read_bytes_per_token"] / (disk_bw * 1e9) if disk_bw else 0.0
        floor = disk_ms + r["ms_per_token"]
        floor_median = disk_ms + r["median_step_ms"]
        floors.append(
            {
                "name": n,
                "view": view,
                "ms": s["ms_per_token"],
                "bytes": s["read_bytes_per_token"],
                "disk_ms": disk_ms,
                "resident": res,
                "resident_ms": r["ms_per_token"],
                "floor_ms": floor,
                "ratio": s["ms_per_token"] / floor if floor else 0.0,
                "median_ms": s["median_step_ms"],
                "floor_median_ms": floor_median,
                "ratio_median": s["median_step_ms"] / floor_median if floor_median else 0.0,
            }
        )
    return floors


def targets_and_floors(S: dict, cfgs: dict, disk_bw: float) -> tuple[list[dict], list[dict]]:
    """Check the issue's three targets on all runs and on quiet runs; compute the floors of both views."""
    floors = floors_for(S, cfgs, disk_bw, "all") + floors_for(S, cfgs, disk_bw, "quiet")
    targets = []
    pairs = [("ml-bf16-lru-pf", "hf-offload-bf16"), ("ml-fp32-lru-pf", "hf-offload-fp32")]
    base = [
        (S[h]["decode_tps"], h) for h in ("hf-offload-bf16", "hf-offload-fp32") if S.get(h, {}).get("runs")
    ]
    mls = [(S[n]["decode_tps"], n) for n in S if cfgs[n]["group"] == "moe-local" and S[n].get("runs")]
    if base and mls and (max(mls)[1], max(base)[1]) not in pairs:
        pairs.append((max(mls)[1], max(base)[1]))
    for ml, hf in pairs:
        for view in ("all", "quiet"):
            a, b = _view(S, ml, view), _view(S, hf, view)
            if a is None or b is None or not b["decode_tps"]:
                continue
            x = a["decode_tps"] / b["decode_tps"]
            xm = b["median_step_ms"] / a["median_step_ms"] if a["median_step_ms"] else 0.0
            targets.append(
                _verdict(
                    f"decode tok/s >= {TARGET_SPEEDUP:.0f}x accelerate (`{ml}` / `{hf}`), {view} runs",
                    f"{a['decode_tps']:.2f} / {b['decode_tps']:.2f} tok/s = {x:.2f}x "
                    f"(by median forward pass {xm:.2f}x; runs {_n(S, ml, view)} / {_n(S, hf, view)})",
                    x >= TARGET_SPEEDUP,
                    f"{x / TARGET_SPEEDUP:.2f} of the target",
                )
            )
    for f in floors:
        if f["name"] in ("ml-bf16-lru-pf", "ml-fp32-lru-pf", "ml-int4-40pct-lru-pf"):
            targets.append(
                _verdict(
                    f"time/token <= {TARGET_FLOOR_RATIO}x floor (`{f['name']}`), {f['view']} runs",
                    f"{f['ms']:.0f} ms vs floor {f['floor_ms']:.0f} ms = {f['ratio']:.2f}x "
                    f"(by median forward pass {f['ratio_median']:.2f}x)",
                    f["ratio"] <= TARGET_FLOOR_RATIO,
                    f"{f['ratio'] / TARGET_FLOOR_RATIO:.2f} of the allowed",
                )
            )
    for n in ("ml-bf16-lru-pf", "ml-bf16-lru-pf-sampled", "ml-fp32-lru-pf", "ml-int4-40pct-lru-pf"):
        rm = S.get(n, {}).get("replay_median")
        if rm and rm["belady"]:
            frac = rm["measured"] / rm["belady"]
            targets.append(
                _verdict(
                    f"hit rate (lru + prefetch) >= {TARGET_BELADY_FRACTION:.0%} of Belady (`{n}`)",
                    f"{100 * rm['measured']:.1f}% vs Belady {100 * rm['belady']:.1f}% = {frac:.2f} "
                    f"(demand-only hits {100 * rm['measured_demand']:.1f}% = "
                    f"{rm['measured_demand'] / rm['belady']:.2f})",
                    frac >= TARGET_BELADY_FRACTION,
                    f"{frac / TARGET_BELADY_FRACTION:.2f} of the target",
                )
            )
    return targets, floors


def _n(S: dict, name: str, view: str) -> int:
    v = _view(S, name, view)
    return int(v["runs"]) if v else 0


def _verdict(target: str, measured: str, ok: bool, how: str) -> dict:
    return {"target": target, "measured": measured, "verdict": ("met" if ok else "missed") + f" ({how})"}


def write_markdown(path: Path, text: str) -> None:
    """Write ``text``, keeping the hand-written notes below ``NOTES_MARK`` of an existing file."""
    notes = f"{NOTES_MARK}\n"
    if path.exists():
        old = path.read_text()
        if NOTES_MARK in old:
            notes = old[old.index(NOTES_MARK) :]
    path.write_text(text + "\n" + notes)


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    """Command line; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--src", type=Path, default=DEFAULT_SRC, help="bf16 Mixtral-shaped HF checkpoint (made if missing)"
    )
    p.add_argument("--int4", type=Path, default=None, help="its int4 moe-local copy (default SRC-int4-rtn)")
    p.add_argument("--budget-mib", type=int, default=700, help="RAM budget for each engine")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per measured decode")
    p.add_argument("--warmup", type=int, default=3, help="warm-up tokens generated before the measured run")
    p.add_argument("--runs", type=int, default=3, help="rounds (each config once per round)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--only", default="", help="comma-separated config names")
    p.add_argument(
        "--quiet-wait", type=float, default=0.0, help="wait up to this many s for an idle machine per run"
    )
    p.add_argument("--json", type=Path, default=ROOT / "results.json")
    p.add_argument("--md", type=Path, default=HERE / "RESULTS-offload.md")
    p.add_argument("--no-md", action="store_true", help="do not write the markdown file")
    p.add_argument("--no-components", action="store_true", help="skip the component microbenchmarks")
    p.add_argument(
        "--render",
        default="",
        help="comma-separated --json files of earlier runs: merge their runs, summarize, write JSON and MD",
    )
    p.add_argument(
        "--profile", default="", help="cProfile one run of this config and print the top functions"
    )
    p.add_argument(
        "--py-spy",
        default="",
        help="comma-separated configs: sample one measured generation of each with py-spy, "
        "summarize it and write the tables to SPY_MD",
    )
    p.add_argument(
        "--spy-md", type=Path, default=ROOT / "profiles.md", help="where --py-spy writes its tables"
    )
    args = p.parse_args(argv)
    args.int4 = args.int4 or args.src.with_name(args.src.name + "-int4-rtn")
    work = ROOT / "work"
    work.mkdir(parents=True, exist_ok=True)
    made = ensure_checkpoints(args.src, args.int4)
    facts = model_facts(args.src, args.int4)
    budget = args.budget_mib * MIB
    cfgs = make_configs(args.src, args.int4, budget, facts, work)
    frac = (budget - facts.dense("bfloat16")) / facts.all_experts_bf16
    print(
        f"budget {budget} B; bf16 experts budget {budget - facts.dense('bfloat16')} B "
        f"= {frac:.1%} of all experts"
    )
    if frac > MAX_EXPERT_FRACTION:
        sys.exit(f"the budget leaves {frac:.0%} of the experts resident; the target needs at most 40%")
    if args.only:
        wanted = set(args.only.split(","))
        cfgs = [c for c in cfgs if c.name in wanted]
    prompt = prompt_ids(args.src)
    if args.render:
        paths = [Path(x) for x in args.render.split(",")]
        results, disk, components, commands = merge_runs(paths)
        names = {c.name for c in cfgs}
        results = {k: v for k, v in results.items() if k in names}
        argv = [*(argv or sys.argv[1:]), "  # merged: " + " | ".join(commands)]
        finish(args, argv, facts, made, prompt, cfgs, results, disk, components)
        return
    if args.profile or args.py_spy:
        profile_runs(args, prompt, work, make_configs(args.src, args.int4, budget, facts, work))
        return
    results: dict[str, list[dict]] = {c.name: [] for c in cfgs}
    disk: dict[str, list[float]] = {"buffered": [], "direct": [], "large": []}
    for r in range(args.runs):
        bw = measure_disk(args.src, facts.expert_bytes_bf16)
        for k in disk:
            if "gbps" in bw[k]:
                disk[k].append(bw[k]["gbps"])
        print(f"round {r + 1}: disk buffered {disk['buffered'][-1]:.3f} GB/s", flush=True)
        for c in cfgs:
            quiet = wait_quiet(args.quiet_wait) if args.quiet_wait else None
            res = run_child(c, args, prompt, work, r)
            res["quiet_before"] = quiet
            if "error" not in res:
                res["replay"] = replay(res, c)
            results[c.name].append(res)
            msg = res.get("error") or (
                f"{res['decode_tps']:.3f} tok/s, {res['read_bytes_per_token'] / 1e6:.1f} MB/token, "
                f"others {res['others_cores']:.2f} cores"
            )
            print(f"  {c.name}: {msg}", flush=True)
            if "error" in res:
                print("\n".join(res["stderr_tail"]), file=sys.stderr)
    components = [] if args.no_components else run_components(args)
    finish(args, argv, facts, made, prompt, cfgs, results, disk, components)


def finish(args, argv, facts, made, prompt, cfgs, results, disk, components) -> None:
    """Summarize the raw results, check the targets, write the JSON and the markdown."""
    summary = {c.name: summarize(c, results[c.name]) for c in cfgs if results.get(c.name)}
    cfg_dicts = {
        c.name: {**c.__dict__, "model": str(c.model), "evict": [str(x) for x in c.evict]}
        for c in cfgs
        if c.name in summary
    }
    disk_bw = max(med(disk["buffered"]), med(disk["direct"]))
    targets, floors = targets_and_floors(summary, cfg_dicts, disk_bw)
    others = [s["others_cores"] for s in summary.values() if s.get("runs")]
    data = {
        "machine": machine_info(args.src),
        "fingerprint": package_fingerprint(),
        "command": "python " + " ".join([os.path.relpath(__file__, Path.cwd()), *(argv or sys.argv[1:])]),
        "args": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}},
        "facts": facts.__dict__,
        "made": made,
        "prompt_len": len(prompt),
        "configs": list(cfg_dicts.values()),
        "disk": {
            "floor_gbps": disk_bw,
            "large_gbps": med(disk["large"]),
            "large_all": disk["large"],
            "buffered_gbps": med(disk["buffered"]),
            "buffered_all": disk["buffered"],
            "direct_gbps": med(disk["direct"]),
            "direct_all": disk["direct"],
        },
        "summary": summary,
        "results": results,
        "targets": targets,
        "floors": floors,
        "others_cores_median": med(others),
        "components": components,
    }
    data["agreement"] = agreement(summary)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1, default=str))
    text = render(data)
    print(text)
    if not args.no_md:
        write_markdown(args.md, text)


def merge_runs(paths: list[Path]) -> tuple[dict, dict, list, list[str]]:
    """Raw results, disk figures and components of earlier ``--json`` files, put together.

    Returns:
        (results per config, disk lists, components of the last file that has them, their commands).
    """
    results: dict[str, list[dict]] = {}
    disk: dict[str, list[float]] = {"buffered": [], "direct": [], "large": []}
    components: list = []
    commands = []
    for path in paths:
        data = json.loads(path.read_text())
        commands.append(data.get("command", str(path)))
        for name, runs in data["results"].items():
            results.setdefault(name, []).extend(runs)
        for key in disk:
            disk[key] += data["disk"].get(f"{key}_all", [])
        components = data.get("components") or components
    return results, disk, components, commands


if __name__ == "__main__":
    main()
