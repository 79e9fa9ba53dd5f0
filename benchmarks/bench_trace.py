"""Expert-cache hit rates on the demo model over held-out text: LRU, LFU, default (LRU + prefetch), Belady.

The demo MoE (``moe-local demo``) reads each corpus' valid split token by token, as generation
would (teacher forcing: a short prefill, then one token per forward pass with the KV cache), with
the expert budget set to a fraction of all experts. For each run it reports the cache's measured
hit rate, and replays the recorded routing trace at the same slot count under LRU, LFU and
Belady's optimal policy (the best any demand-only cache could do with that many slots).

    python benchmarks/bench_trace.py                 # 25% and 50% budgets, 256 tokens per corpus
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "data" / "corpora"
sys.path.insert(0, str(ROOT))

CONFIGS = {"lru": ("lru", False), "lfu": ("lfu", False), "lru+prefetch (default)": ("lru", True)}


def run(demo: Path, ids: torch.Tensor, fraction: float, policy: str, prefetch: bool, prefill: int) -> dict:
    """Teacher-forced decode of ``ids``; returns measured hit rate, slots and the trace's replays."""
    import moe_local
    from moe_local.config import LoadOptions
    from moe_local.experts.trace import TraceRecorder, read_trace, replay
    from moe_local.inspection import inspect_model

    info = inspect_model(str(demo))
    total_experts = info.moe_layers * info.experts_per_layer
    probe = moe_local.load(demo)  # bytes of one resident expert, kernel-layout copy included
    with torch.inference_mode():
        probe.model(input_ids=ids[None, :64])  # (every layer-0 expert computes at least once)
    per_expert = max(probe.store.get(0, e).nbytes for e in range(info.experts_per_layer))
    del probe
    slots = max(1, int(fraction * total_experts))
    budget = int(slots * per_expert) + 1
    lm = moe_local.load(demo, LoadOptions(expert_memory=budget, policy=policy, prefetch=prefetch))
    trace = io.StringIO()
    recorder = TraceRecorder(lm.model, trace)
    from transformers import DynamicCache

    cache = DynamicCache()
    t0 = time.perf_counter()
    before = lm.store.stats()  # the prefill counts for both the cache and the replays
    with torch.inference_mode():
        lm.model(input_ids=ids[None, :prefill], past_key_values=cache, use_cache=True)
        recorder.flush(0)
        for step in range(prefill, len(ids)):
            lm.model(input_ids=ids[None, step : step + 1], past_key_values=cache, use_cache=True)
            recorder.flush(step)
    stats = lm.store.stats().minus(before)
    seconds = time.perf_counter() - t0
    path = Path("/tmp/moe-trace.jsonl")
    path.write_text(trace.getvalue())
    keys = read_trace(path)
    resident = sum(len(lm.store.resident(la)) for la in range(info.layers))
    lm.store.close()
    return {
        "slots": slots,
        "resident_at_end": resident,
        "measured": stats.hit_rate,
        "prefetch_accuracy": stats.prefetch_accuracy,
        "replay": replay(keys, slots),
        "uses": len(keys),
        "tok_s": (len(ids) - prefill) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens read per corpus")
    parser.add_argument("--prefill", type=int, default=16)
    parser.add_argument("--fractions", default="0.25,0.5", help="expert budgets as fractions of all experts")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from moe_local.demo import ensure_demo
    from moe_local.demo.quality import text_ids

    demo = ensure_demo()
    tok = AutoTokenizer.from_pretrained(demo)
    print(f"demo: {demo}; {args.tokens} tokens per corpus, the first {args.prefill} as prefill")
    print(
        "| corpus | budget | slots | config | measured hit % | LRU % | LFU % | Belady % "
        "| measured / Belady | guess right % | tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for corpus in ("shakespeare", "brown"):
        ids = text_ids(tok, CORPORA / corpus / "valid.txt", args.tokens)
        for fraction in (float(f) for f in args.fractions.split(",")):
            for name, (policy, prefetch) in CONFIGS.items():
                r = run(demo, ids, fraction, policy, prefetch, args.prefill)
                rep = r["replay"]
                guess = f"{100 * r['prefetch_accuracy']:.0f}" if prefetch else "-"
                print(
                    f"| {corpus} | {fraction:.0%} | {r['slots']} | {name} | {100 * r['measured']:.1f} | "
                    f"{100 * rep['lru']:.1f} | {100 * rep['lfu']:.1f} | {100 * rep['belady']:.1f} | "
                    f"{r['measured'] / rep['belady']:.2f} | {guess} | {r['tok_s']:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
