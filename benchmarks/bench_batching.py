"""Aggregate decode speed of the server's engine with 1, 2, 4 and 8 streams decoded together.

Each round sends k concurrent greedy requests (different short prompts, ``--tokens`` tokens each,
EOS ignored) to an engine (``moe_local.server.engine.Engine``, the server's own worker, without
HTTP) and measures aggregate tokens/s = k * tokens / wall time from submission to the last token
(prefill included: the prompts are a dozen tokens). Stream counts alternate within each round and
the medians over rounds are printed, since the machine may be shared. ``1 (serial)`` is today's
one-at-a-time worker (``parallel=1``); the others run on an engine with ``parallel=8``. Every
batched answer is compared with the same prompt served alone; "identical" counts those equal.

Models: the demo (``moe-local demo``'s folder, bf16 dense and 4-bit experts, all in RAM) and a
small random Mixtral written by ``synth_hf.py`` (bf16, hidden 512, expert FFN 1536, 4 layers, 8
experts, top 2) loaded with ``--expert-fraction`` of its experts' bytes in RAM, so decoding misses
and reads experts from disk (the case batching is for: one read serves every stream routed there).

    python benchmarks/bench_batching.py                         # demo and synth, 3 rounds
    python benchmarks/bench_batching.py --models synth --rounds 5 --tokens 48
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYNTH = Path(tempfile.gettempdir()) / "moe-batching" / "synth-mixtral"
PROMPTS = [f"Request {i}: tell me about the {w} of the sea" for i, w in enumerate("abcdefgh")]


def synth_model(out: Path = SYNTH) -> Path:
    """The small random Mixtral, written once."""
    if not (out / "config.json").exists():
        sys.path.insert(0, str(HERE))
        from synth_hf import SynthSpec, write_synthetic_mixtral

        spec = SynthSpec(hidden=512, ffn=1536, layers=4, experts=8, heads=8, kv_heads=2, vocab=32000)
        write_synthetic_mixtral(out, spec)
    return out


def expert_bytes(folder: Path) -> int:
    """Bytes of the checkpoint's expert tensors (from its safetensors headers)."""
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if ".experts." in name:
                    sl = st.get_slice(name)
                    total += _numel(sl.get_shape()) * 2  # bf16
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def start(model: Path, options, parallel: int):
    """An engine serving ``model``, loaded."""
    from moe_local.server.engine import Engine
    from moe_local.server.jobs import State

    engine = Engine(model, options, parallel=parallel, max_queue=64)
    engine.start()
    while engine.state is State.LOADING:
        time.sleep(0.1)
    if engine.state is not State.READY:
        raise SystemExit(f"cannot load {model}: {engine.error}")
    return engine


async def round_trip(engine, prompts: list[list[int]], tokens: int) -> tuple[float, list[list[str]]]:
    """Send the prompts at once; the wall time and each answer's token texts."""
    from moe_local.config import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def one(job) -> list[str]:
        return [s.token_text async for s in job.steps() if s.token_text is not None]

    t0 = time.perf_counter()
    jobs = [engine.submit(p, params, logprobs=True) for p in prompts]
    answers = await asyncio.gather(*(one(j) for j in jobs))
    return time.perf_counter() - t0, list(answers)


def measure(name: str, model: Path, options, streams: list[int], tokens: int, rounds: int) -> dict:
    """Median aggregate tokens/s per stream count, alternating within rounds."""
    serial, batched = start(model, options, 1), start(model, options, max(streams))
    try:
        prompts = [serial.encode(p, chat=False) for p in PROMPTS[: max(streams)]]
        asyncio.run(round_trip(batched, prompts, tokens))  # warm-up: first reads, allocator, caches
        alone = [asyncio.run(round_trip(serial, [p], tokens))[1][0] for p in prompts]
        runs: dict[str, list[float]] = {"1 (serial)": [], **{str(k): [] for k in streams}}
        same = {str(k): [0, 0] for k in streams}
        misses: dict[str, list[float]] = {key: [] for key in runs}
        for r in range(rounds):
            order = [("1 (serial)", serial, 1)] + [(str(k), batched, k) for k in streams]
            order = order[r % len(order) :] + order[: r % len(order)]  # a different one first each round
            for key, engine, k in order:
                before = engine.gauges().expert_misses
                wall, answers = asyncio.run(round_trip(engine, prompts[:k], tokens))
                runs[key].append(k * tokens / wall)
                misses[key].append((engine.gauges().expert_misses - before) / (k * tokens))
                if key in same:
                    same[key][0] += sum(a == b for a, b in zip(answers, alone, strict=False))
                    same[key][1] += k
                print(f"  {name} round {r + 1} streams {key}: {k * tokens / wall:.1f} tok/s", file=sys.stderr)
    finally:
        for engine in (serial, batched):
            engine.stop()
            if engine._thread is not None:  # let the worker leave torch before the interpreter does
                engine._thread.join(timeout=60)
    base = statistics.median(runs["1 (serial)"])
    rows = {}
    for key, values in runs.items():
        med = statistics.median(values)
        rows[key] = {
            "tok_s": round(med, 2),
            "vs_serial": round(med / base, 2),
            "misses_per_token": round(statistics.median(misses[key]), 2),
            "identical": None if key not in same else f"{same[key][0]}/{same[key][1]}",
            "runs": [round(v, 2) for v in values],
        }
    return rows


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a JSON report and a Markdown table."""
    from moe_local.config import LoadOptions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,synth", help="comma list of demo, synth")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per request")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--expert-fraction", type=float, default=0.4, help="synth: experts' bytes kept in RAM")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",")]
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()}".strip(),
        "tokens": args.tokens,
        "rounds": args.rounds,
        "results": {},
    }
    import os

    report["cpus"] = os.cpu_count()
    for name in args.models.split(","):
        if name == "demo":
            from moe_local.demo import demo_path

            model, options = Path(demo_path()), LoadOptions()
        elif name == "synth":
            model = synth_model()
            budget = int(expert_bytes(model) * args.expert_fraction)
            options = LoadOptions(expert_memory=budget)
            name = f"synth ({args.expert_fraction:.0%} of experts in RAM)"
        else:
            raise SystemExit(f"unknown model {name!r} (demo or synth)")
        report["results"][name] = measure(name, model, options, streams, args.tokens, args.rounds)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| model | streams | aggregate tok/s | x serial | misses/token | identical to alone |")
    print("|---|---|---|---|---|---|")
    for name, rows in report["results"].items():
        for key, row in rows.items():
            cells = [
                name,
                key,
                row["tok_s"],
                row["vs_serial"],
                row["misses_per_token"],
                row["identical"] or "-",
            ]
            print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
