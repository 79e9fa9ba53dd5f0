"""CPU quantized-linear kernels: per-call speed, first-call cost, bytes held, int8 options, lm_head.

Modes (``--mode``), each timed in one process, alternating the compared variants within each round
so the machine's drift hits all alike, medians of ``--reps`` calls:

* ``experts`` (default): one expert's forward (gate_up [2I, H], SiLU gate, down [H, I]) per scheme
  against dense bf16; weights are random, quantized with rtn (the kernels do not depend on how scale
  and zero were chosen) or bitsandbytes; then the bytes each expert holds after its first call.
* ``first-call``: the first forward of fresh experts (kernel-layout conversion included) against
  later ones, per scheme.
* ``int8``: 8-bit group-wise weights: dequantizing every call, a dense bf16 copy, the int8 kernel
  (``linear``'s automatic choice) and torch's per-channel int8 kernel (a bound: another scheme).
* ``lm-head``: a vocabulary projection in bf16 against 8-bit kernels.
* ``ttft``: time to first token of the built-in demo (``moe-local demo``), after loading, with
  ``--prepare`` converting every weight before the first token as a reader would.

``--root DIR`` imports moe-local from another checkout (e.g. ``git archive HEAD``) for before/after.

    python benchmarks/bench_kernels.py                       # Mixtral-8x7B and demo expert shapes
    python benchmarks/bench_kernels.py --shapes 576x1536 --tokens 1
    python benchmarks/bench_kernels.py --mode int8 --shapes 576x576,1536x576,4096x4096,14336x4096
    python benchmarks/bench_kernels.py --mode ttft --threads 1 --prepare
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

SCHEMES = ["bf16", "fp32", "int8-g64", "int4-g64", "int3-g64", "int2-g64", "nf4", "fp4", "int8"]
INT8_SHAPES = "576x576,1536x576,4096x4096,14336x4096"  # OxI: attention / projection shapes
LM_HEAD_SHAPES = "32000x4096,49152x576"  # vocab x hidden: Mixtral, SmolLM2


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mode", default="experts", choices=["experts", "first-call", "int8", "lm-head", "ttft"]
    )
    parser.add_argument(
        "--shapes", help="HIDDENxINTER (experts modes) or OUTxIN (int8, lm-head), comma-separated"
    )
    parser.add_argument("--tokens", help="tokens per call, comma-separated")
    parser.add_argument("--threads", default="1,2", help="torch threads, comma-separated")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--prepare", action="store_true", help="ttft: convert every weight after loading")
    parser.add_argument("--decode", type=int, default=32, help="ttft: tokens decoded for the tokens/s figure")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    return parser.parse_args()


ARGS = _args()
sys.path.insert(0, str(ARGS.root))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _shapes(text: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in (s.split("x") for s in text.split(","))]


def timed(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median ms per call of each function, alternating them; one warm-up each, fewer reps when slow."""
    for f in fns.values():
        f()
    slow = {k: False for k in fns}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for k, f in fns.items():
            if slow[k] and r >= 2:
                continue
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
            slow[k] = times[k][-1] > 0.5  # a call over half a second: three are enough
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def weight_bytes(w) -> int:
    from moe_local.experts.weights import weight_nbytes

    return weight_nbytes(w)


def make_expert(hidden: int, inter: int, scheme: str, gen: torch.Generator):
    """(gate_up, down) for ``scheme``; weights ~ N(0, 0.02) like a trained layer."""
    from moe_local.quant.api import parse_scheme, quantize_scheme

    gate_up = (torch.randn(2 * inter, hidden, generator=gen) * 0.02).to(torch.bfloat16)
    down = (torch.randn(hidden, inter, generator=gen) * 0.02).to(torch.bfloat16)
    if scheme == "bf16":
        return gate_up, down
    if scheme == "fp32":
        return gate_up.float(), down.float()
    q = parse_scheme(scheme)
    return quantize_scheme(gate_up, q), quantize_scheme(down, q)


def expert_call(x: torch.Tensor, gate_up, down) -> torch.Tensor:
    from moe_local.experts.weights import apply_linear

    h = apply_linear(x, gate_up)  # [T, 2I]
    gate, up = h.chunk(2, dim=-1)
    return apply_linear(F.silu(gate) * up, down)  # [T, H]


def _x(tokens: int, width: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(tokens, width, generator=gen).to(dtype)


def mode_experts(gen: torch.Generator) -> None:
    schemes = ARGS.schemes.split(",")
    print(f"| shape HxI | threads | tokens | {' | '.join(schemes)} |")
    print("|---|---|---|" + "---|" * len(schemes))
    for hidden, inter in _shapes(ARGS.shapes or "4096x14336,576x1536"):
        experts = {s: make_expert(hidden, inter, s, gen) for s in schemes}
        for threads in _ints(ARGS.threads):
            torch.set_num_threads(threads)
            for tokens in _ints(ARGS.tokens or "1,16"):
                xs = {
                    s: _x(tokens, hidden, torch.float32 if s == "fp32" else torch.bfloat16, gen)
                    for s in schemes
                }
                with torch.inference_mode():
                    ms = timed(
                        {s: (lambda s=s, xs=xs, ex=experts: expert_call(xs[s], *ex[s])) for s in schemes},
                        ARGS.reps,
                    )
                base = ms.get("bf16")
                cells = [f"{ms[s]:.2f} ms" + (f" ({base / ms[s]:.2f}x)" if base else "") for s in schemes]
                print(f"| {hidden}x{inter} | {threads} | {tokens} | " + " | ".join(cells) + " |", flush=True)
        sizes = {s: weight_bytes(experts[s][0]) + weight_bytes(experts[s][1]) for s in schemes}
        listed = ", ".join(f"{s} {sizes[s] / 1e6:.2f} MB" for s in schemes)
        print(f"bytes per {hidden}x{inter} expert after its calls (kernel layouts included): {listed}")


def mode_first_call(gen: torch.Generator) -> None:
    schemes = [s for s in ARGS.schemes.split(",") if s not in ("bf16", "fp32")]
    count = 8
    print("| shape HxI | threads | scheme | first call ms | later call ms | MB before | MB after |")
    print("|---|---|---|---|---|---|---|")
    for hidden, inter in _shapes(ARGS.shapes or "576x1536,4096x14336"):
        for threads in _ints(ARGS.threads):
            torch.set_num_threads(threads)
            for s in schemes:
                experts = [make_expert(hidden, inter, s, gen) for _ in range(count if hidden < 2048 else 2)]
                x = _x(1, hidden, torch.bfloat16, gen)
                before = sum(weight_bytes(w) for e in experts for w in e) / len(experts)
                firsts, laters = [], []
                with torch.inference_mode():
                    for e in experts:
                        t0 = time.perf_counter()
                        expert_call(x, *e)
                        firsts.append(time.perf_counter() - t0)
                    for e in experts:
                        t0 = time.perf_counter()
                        expert_call(x, *e)
                        laters.append(time.perf_counter() - t0)
                after = sum(weight_bytes(w) for e in experts for w in e) / len(experts)
                first, later = 1e3 * statistics.median(firsts), 1e3 * statistics.median(laters)
                print(
                    f"| {hidden}x{inter} | {threads} | {s} | {first:.2f} | {later:.2f} | {before / 1e6:.2f} "
                    f"| {after / 1e6:.2f} |",
                    flush=True,
                )


def _int8_variants(o: int, i: int, group: int, gen: torch.Generator) -> tuple[dict, dict]:
    """The 8-bit options for one [O, I] weight: call builders and bytes held."""
    from moe_local.quant.api import quantize_scheme

    w = torch.randn(o, i, generator=gen) * 0.02
    qt, stored = quantize_scheme(w, f"int8-g{group}"), quantize_scheme(w, f"int8-g{group}")
    dense = qt.dequantize(torch.bfloat16)
    per_channel = torch.randint(-128, 128, (o, i), generator=gen, dtype=torch.int8)
    scale = (torch.rand(o, generator=gen) * 1e-3).to(torch.bfloat16)
    calls = {
        "dequantize": lambda x: stored.linear(x, use_kernel=False),
        "bf16 copy": lambda x: F.linear(x, dense),
        "linear()": lambda x: qt.linear(x),
        "int8 per-channel": lambda x: torch.ops.aten._weight_int8pack_mm(x, per_channel, scale),
    }
    qt.linear(torch.zeros(1, i, dtype=torch.bfloat16))  # the automatic path's first call
    try:  # the per-group int8 kernel also where linear() takes the nibbles (absent before it existed)
        from moe_local.quant import int8_kernel

        grouped, kept = quantize_scheme(w, f"int8-g{group}"), int8_kernel.SPLIT_MAX_WEIGHTS
        int8_kernel.SPLIT_MAX_WEIGHTS = 0
        grouped.linear(torch.zeros(1, i, dtype=torch.bfloat16))
        int8_kernel.SPLIT_MAX_WEIGHTS = kept
        calls["per-group kernel"] = lambda x: grouped.linear(x)
    except ImportError:
        pass
    held = {
        "dequantize": stored.nbytes,
        "bf16 copy": dense.numel() * 2,
        "linear()": weight_bytes(qt),
        "int8 per-channel": o * i + 2 * o,
    }
    if "per-group kernel" in calls:
        held["per-group kernel"] = weight_bytes(grouped)
    return calls, held


def _compare(
    title: str, shapes: list[tuple[int, int]], tokens: list[int], gen: torch.Generator, lm: bool
) -> None:
    print(f"{title}\n")
    header = None
    for o, i in shapes:
        group = 128 if i % 128 == 0 else 64
        calls, held = _lm_variants(o, i, gen) if lm else _int8_variants(o, i, group, gen)
        if header is None:
            header = list(calls)
            print(f"| O x I | threads | tokens | {' | '.join(header)} |")
            print("|---|---|---|" + "---|" * len(header))
        for threads in _ints(ARGS.threads):
            torch.set_num_threads(threads)
            for m in tokens:
                x = _x(m, i, torch.bfloat16, gen)
                with torch.inference_mode():
                    ms = timed({k: (lambda f=f, x=x: f(x)) for k, f in calls.items()}, ARGS.reps)
                base = ms[header[0]]
                cells = [f"{ms[k]:.2f} ms ({base / ms[k]:.2f}x)" for k in header]
                print(f"| {o}x{i} | {threads} | {m} | " + " | ".join(cells) + " |", flush=True)
        print(f"bytes held for {o}x{i}: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in held.items()))


def _lm_variants(o: int, i: int, gen: torch.Generator) -> tuple[dict, dict]:
    """A vocabulary projection: bf16, torch's per-channel int8 kernel, int8-g128 (g64 where 128 does not
    divide I), int4-g64."""
    from moe_local.quant.api import quantize_scheme

    w = (torch.randn(o, i, generator=gen) * 0.02).to(torch.bfloat16)
    absmax = w.float().abs().amax(dim=1).clamp_min(1e-8)
    per_channel = torch.round(w.float() / (absmax[:, None] / 127)).to(torch.int8)
    scale = (absmax / 127).to(torch.bfloat16)
    group = 128 if i % 128 == 0 else 64
    g8, g4 = quantize_scheme(w, f"int8-g{group}"), quantize_scheme(w, "int4-g64")
    calls = {
        "bf16": lambda x: F.linear(x, w),
        "int8 per-channel": lambda x: torch.ops.aten._weight_int8pack_mm(x, per_channel, scale),
        "int8 group-wise linear()": lambda x: g8.linear(x),
        "int4-g64 linear()": lambda x: g4.linear(x),
    }
    x = torch.zeros(1, i, dtype=torch.bfloat16)
    g8.linear(x), g4.linear(x)
    held = {
        "bf16": o * i * 2,
        "int8 per-channel": o * i + 2 * o,
        "int8 group-wise linear()": weight_bytes(g8),
        "int4-g64 linear()": weight_bytes(g4),
    }
    return calls, held


def mode_ttft() -> None:
    from moe_local import demo
    from moe_local.config import SamplingParams
    from moe_local.generation import stream_generate
    from moe_local.loading.loader import load

    torch.set_num_threads(_ints(ARGS.threads)[0])
    path = demo.demo_path()
    if not demo.is_ready(path):
        sys.exit(f"the demo is not built at {path}: run `moe-local demo` first")
    t0 = time.perf_counter()
    lm = load(path)
    loaded = time.perf_counter() - t0
    prepared = 0.0
    if ARGS.prepare:  # what a reader converting at read time would have done before the first token
        t0 = time.perf_counter()
        _prepare_all(lm)
        prepared = time.perf_counter() - t0
    params = SamplingParams(max_tokens=1, temperature=0.0)
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        for _ in stream_generate(lm, "Hi", params):
            pass
        runs.append(time.perf_counter() - t0)
    stamps = []
    decode_params = SamplingParams(max_tokens=ARGS.decode + 1, temperature=0.0, ignore_eos=True)
    for _ in stream_generate(lm, "Hi", decode_params):
        stamps.append(time.perf_counter())
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"threads {torch.get_num_threads()}: load {loaded:.2f} s, prepare {prepared:.2f} s, first token "
        f"{runs[0]:.2f} s, again {runs[1]:.2f} s, decode {decode:.1f} tokens/s ({len(stamps) - 1} tokens), "
        f"peak RSS {rss:.0f} MB, experts {lm.store.resident_bytes / 1e6:.1f} MB"
    )


def _prepare_all(lm) -> None:
    from moe_local.quant.base import QuantizedWeight

    for module in lm.model.modules():
        if hasattr(module, "prepare_kernel") and not isinstance(module, QuantizedWeight):
            module.prepare_kernel(torch.bfloat16)
    store = lm.store
    for site in lm.sites:
        for e in sorted(store.resident(site.layer)):
            w = store.get(site.layer, e)
            for part in (w.gate_up, w.up, w.down):
                prepare = getattr(part, "prepare_kernel", None)  # absent before this change
                if isinstance(part, QuantizedWeight) and prepare is not None:
                    prepare(torch.bfloat16)
    store.reset_stats()


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    if ARGS.mode == "experts":
        mode_experts(gen)
    elif ARGS.mode == "first-call":
        mode_first_call(gen)
    elif ARGS.mode == "int8":
        tokens = _ints(ARGS.tokens or "1,512")
        _compare(
            "8-bit group-wise options, bf16 activations",
            _shapes(ARGS.shapes or INT8_SHAPES),
            tokens,
            gen,
            False,
        )
    elif ARGS.mode == "lm-head":
        tokens = _ints(ARGS.tokens or "1")
        _compare(
            "vocabulary projection, bf16 activations",
            _shapes(ARGS.shapes or LM_HEAD_SHAPES),
            tokens,
            gen,
            True,
        )
    else:
        mode_ttft()


if __name__ == "__main__":
    main()
