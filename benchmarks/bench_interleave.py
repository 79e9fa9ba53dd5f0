"""Row-interleaved against separate codes, scales and zeros: one decode row through the native kernel.

Enough copies of one quantized matrix to exceed the caches are read in turn (so every call reads
RAM, as a decode step does), in the blob's layout (three arrays) and interleaved
(``moe_local.quant.interleave``), alternating, medians over rounds:

    python benchmarks/bench_interleave.py --shape 7168 1024 --bits 4 --group 64 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=2, default=(7168, 1024), metavar=("O", "I"))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mib", type=int, default=512, help="bytes of copies read in turn (default 512 MiB)")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from moe_local.quant import QType, native, quantize
    from moe_local.quant.interleave import interleave

    if not native.available():
        raise SystemExit("error: the native kernel is not available on this machine")
    o, i = a.shape
    one = quantize(torch.randn(o, i), QType(a.bits, a.group))
    copies = max(2, a.mib * 2**20 // one.nbytes)
    fresh = (one.packed.clone(), one.scales.clone(), one.zeros.clone())  # new buffers of the same bytes
    plain = [type(one)(*(t.clone() for t in fresh), one.shape, one.qtype) for _ in range(copies)]
    mixed = [interleave([w])[0] for w in plain]
    x = torch.randn(1, i).bfloat16()
    calls = {
        "separate": [w.native_weight() for w in plain],
        "interleaved": [w.native_weight() for w in mixed],
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(a.rounds):
        for name in sorted(calls, reverse=bool(r % 2)):  # alternate which layout runs first
            start = time.perf_counter()
            for w in calls[name]:
                w.linear_bf16(x)
            times[name].append((time.perf_counter() - start) / len(calls[name]))
    print(f"{o} x {i}, int{a.bits}-g{a.group}, {a.threads} thread(s), {copies} copies of {one.nbytes} B:")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:12s} {t * 1e6:8.1f} us/call  {one.nbytes / t / 1e9:6.2f} GB/s (median of {len(ts)})")


if __name__ == "__main__":
    main()
