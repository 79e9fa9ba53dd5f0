"""Teacher-forced perplexity token by token (the decode path: one token a step) on the built-in demo.

What the CPU decode kernels cost in quality, which full-window ``eval`` (the prefill path) does not
see. Run once per kernel choice and compare (``benchmarks/QUALITY.md``, Notes):

    python benchmarks/bench_decode_nll.py ../shared/data/corpora/shakespeare/valid.txt 400
    MOE_LOCAL_NATIVE=0 python benchmarks/bench_decode_nll.py ../shared/data/corpora/shakespeare/valid.txt 400
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("text", type=Path, help="a UTF-8 text file")
    parser.add_argument("tokens", type=int, nargs="?", default=400, help="tokens scored (default 400)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import DynamicCache

    from moe_local import demo
    from moe_local.loading.loader import load

    lm = load(demo.demo_path())
    ids = lm.tokenizer(args.text.read_text()[: 20 * args.tokens])["input_ids"][: args.tokens]
    cache, nll = DynamicCache(), 0.0
    with torch.inference_mode():
        for t in range(len(ids) - 1):
            out = lm.model(torch.tensor([[ids[t]]]), past_key_values=cache, use_cache=True)
            logp = torch.log_softmax(out.logits[0, -1].float(), -1)
            nll -= float(logp[ids[t + 1]])
    n = len(ids) - 1
    native = os.environ.get("MOE_LOCAL_NATIVE", "1")
    print(f"MOE_LOCAL_NATIVE={native}: {n} tokens, perplexity {math.exp(nll / n):.4f} ({lm.model.dtype})")


if __name__ == "__main__":
    main()
