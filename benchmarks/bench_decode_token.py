"""One decode token's routed experts of a layer: the per-expert loop against the one native call.

``OffloadedExperts.decode_token`` runs a token's resident quantized experts in one native call
(``native.experts_bf16``); this times it against the loop it replaces (one call and two torch ops
per expert), alternating, medians over random tokens and routings, on any moe-local folder:

    moe-local synth q3 --like qwen3-30b-a3b --layers 2 --recipe all-4bit
    python benchmarks/bench_decode_token.py q3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--tokens", type=int, default=200, help="tokens timed per round (default 200)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from moe_local.config import LoadOptions
    from moe_local.experts import module
    from moe_local.loading.loader import load

    lm = load(a.model, LoadOptions(), tokenizer=False)
    layers = [m for m in lm.model.modules() if isinstance(m, module.OffloadedExperts)]
    text = lm.model.config.get_text_config()
    hidden, experts, top_k = int(text.hidden_size), layers[0].num_experts, int(text.num_experts_per_tok)
    fused_token = module.OffloadedExperts._fused_token
    gen = torch.Generator().manual_seed(0)

    def median_us(fused: bool) -> float:
        module.OffloadedExperts._fused_token = fused_token if fused else (lambda self, *args: None)
        times = []
        with torch.inference_mode():
            for i in range(a.tokens):
                x = torch.randn(1, hidden, generator=gen).bfloat16()
                ids = torch.randperm(experts, generator=gen)[:top_k].tolist()
                weights = torch.softmax(torch.randn(top_k, generator=gen), -1)
                start = time.perf_counter()
                layers[i % len(layers)].decode_token(x, ids, weights)
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    for _ in range(a.rounds):
        loop, fused = median_us(False), median_us(True)
        print(f"{top_k} experts of width {hidden}: loop {loop:.0f} us, one call {fused:.0f} us a layer")
    module.OffloadedExperts._fused_token = fused_token


if __name__ == "__main__":
    main()
