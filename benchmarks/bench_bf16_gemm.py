"""Prefill with and without torch's bf16 GEMM for many rows (``moe_local.quant.native.BF16_GEMM``).

On a CPU with bf16 dot products (AVX-512 BF16, AMX) moe-local multiplies many bf16 rows in torch's
bf16 GEMM (4-bit-or-fewer weights: ``W_hat`` rounded to bf16 first) instead of widening to float32.
This measures both settings in one process, alternating: prompt tokens/s on random ids, and
perplexity on real text (second half of each window scored) so the quality cost is seen too:

    python benchmarks/bench_bf16_gemm.py MODEL --text ../shared/data/corpora/shakespeare/valid.txt
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text for the perplexity")
    p.add_argument("--tokens", type=int, default=512, help="prompt length and window (default 512)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from moe_local.loading.loader import load
    from moe_local.quant import native

    lm = load(a.model)
    ids = lm.tokenizer(a.text.read_text()[: 8 * a.tokens * (a.windows + 1)])["input_ids"]
    w = a.tokens
    windows = [ids[i : i + w] for i in range(0, len(ids) - w, w)][: a.windows]
    prompt = torch.randint(
        0, lm.model.config.get_text_config().vocab_size, (1, w), generator=torch.Generator().manual_seed(0)
    )
    speeds: dict[bool, list[float]] = {False: [], True: []}
    ppl: dict[bool, float] = {}
    with torch.inference_mode():
        for rep in range(a.reps):
            for flag in (False, True) if rep % 2 == 0 else (True, False):
                native.BF16_GEMM = flag
                t = time.perf_counter()
                lm.model(input_ids=prompt, logits_to_keep=1)
                speeds[flag].append(w / (time.perf_counter() - t))
        for flag in (False, True):
            native.BF16_GEMM = flag
            nll, n = 0.0, 0
            for win in windows:
                logits = lm.model(input_ids=torch.tensor([win])).logits[0].float()
                logp = torch.log_softmax(logits[w // 2 : -1], -1)
                target = torch.tensor(win[w // 2 + 1 :])
                nll -= float(logp.gather(1, target[:, None]).sum())
                n += len(target)
            ppl[flag] = math.exp(nll / n)
    for flag, name in ((False, "float32 GEMM"), (True, "bf16 GEMM")):
        print(
            f"{name}: prefill-{w} median {statistics.median(speeds[flag]):.1f} tokens/s "
            f"(n={a.reps}), perplexity {ppl[flag]:.4f} ({len(windows)} windows)"
        )


if __name__ == "__main__":
    main()
