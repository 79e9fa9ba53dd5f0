"""CPU expert kernels: one expert's forward per quantization scheme against dense bf16.

An expert is gate_up [2I, H] then SiLU-gated, then down [H, I]; weights are random bf16, quantized
with moe-local's rtn (the kernel does not depend on how scale and zero were chosen) or with
bitsandbytes. Each row is the median of ``--reps`` timed calls after warm-up, measured in the same
process, alternating schemes within each round so the machine's drift hits all alike.

    python benchmarks/bench_kernels.py                       # Mixtral-8x7B and demo expert shapes
    python benchmarks/bench_kernels.py --shapes 576x1536 --tokens 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMES = ["bf16", "fp32", "int8-g64", "int4-g64", "int3-g64", "int2-g64", "nf4", "fp4", "int8"]


def make_expert(hidden: int, inter: int, scheme: str, gen: torch.Generator):
    """(gate_up, down, input dtype) for ``scheme``; weights ~ N(0, 0.02) like a trained layer."""
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


def weight_bytes(w) -> int:
    from moe_local.experts.weights import weight_nbytes

    return weight_nbytes(w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="4096x14336,576x1536", help="HIDDENxINTER, comma-separated")
    parser.add_argument("--tokens", default="1,16", help="tokens per call, comma-separated")
    parser.add_argument("--threads", default="1,2", help="torch threads, comma-separated")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    schemes = args.schemes.split(",")
    print(f"| shape HxI | threads | tokens | {' | '.join(schemes)} |")
    print("|---|---|---|" + "---|" * len(schemes))
    for shape in args.shapes.split(","):
        hidden, inter = (int(v) for v in shape.split("x"))
        experts = {s: make_expert(hidden, inter, s, gen) for s in schemes}
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for tokens in (int(t) for t in args.tokens.split(",")):
                xs = {
                    s: torch.randn(tokens, hidden, generator=gen).to(
                        torch.float32 if s == "fp32" else torch.bfloat16
                    )
                    for s in schemes
                }
                times: dict[str, list[float]] = {s: [] for s in schemes}
                with torch.inference_mode():
                    for s in schemes:  # warm-up (kernel layouts are built on first use)
                        for _ in range(2):
                            expert_call(xs[s], *experts[s])
                    for _ in range(args.reps):
                        for s in schemes:
                            t0 = time.perf_counter()
                            expert_call(xs[s], *experts[s])
                            times[s].append(time.perf_counter() - t0)
                base = statistics.median(times["bf16"]) if "bf16" in times else None
                cells = []
                for s in schemes:
                    ms = 1e3 * statistics.median(times[s])
                    ratio = f" ({base * 1e3 / ms:.2f}x)" if base else ""
                    cells.append(f"{ms:.2f} ms{ratio}")
                print(f"| {shape} | {threads} | {tokens} | " + " | ".join(cells) + " |", flush=True)
        sizes = {s: weight_bytes(experts[s][0]) + weight_bytes(experts[s][1]) for s in schemes}
        listed = ", ".join(f"{s} {sizes[s] / 1e6:.1f} MB" for s in schemes)
        print(f"bytes per {shape} expert (kernel-layout copies included): {listed}")


if __name__ == "__main__":
    main()
