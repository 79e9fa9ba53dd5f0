"""Teacher-forced perplexity token by token (the decode path: one token a step) on the built-in demo.

What the CPU decode kernels cost in quality, which full-window ``eval`` (the prefill path) does not
see. Run once per kernel choice and compare (``benchmarks/QUALITY.md``, Notes):

    python benchmarks/bench_decode_nll.py ../shared/data/corpora/shakespeare/valid.txt 400
    MOE_LOCAL_NATIVE=0 python benchmarks/bench_decode_nll.py ../shared/data/corpora/shakespeare/valid.txt 400

Where the model takes moe-local's lean decode step (``moe_local.lean``), the same tokens are also
scored through it, side by side with transformers' forward, with how often both rank the same
token first. ``--model FOLDER`` scores another folder than the demo.
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
    parser.add_argument("--model", type=Path, help="a model folder (default: the built-in demo)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from moe_local import demo
    from moe_local.generation import cache_keyword, new_cache
    from moe_local.lean.decoder import LeanDecoder
    from moe_local.loading.loader import load

    lm = load(args.model or demo.demo_path())
    ids = lm.tokenizer(args.text.read_text()[: 20 * args.tokens])["input_ids"][: args.tokens]
    cache, nll, lean_nll, agree = new_cache(lm.model), 0.0, 0.0, 0
    keyword = cache_keyword(lm.model)
    with torch.inference_mode():
        out = lm.model(torch.tensor([ids[:1]]), **{keyword: cache}, use_cache=True)
        lean = LeanDecoder.build(lm.model)
        if lean is not None:
            lean.start(cache)  # a copy: transformers' cache goes on with its own forward
        for t in range(len(ids) - 1):
            if t:
                out = lm.model(torch.tensor([[ids[t]]]), **{keyword: cache}, use_cache=True)
            logits = out.logits[0, -1].float()
            nll -= float(torch.log_softmax(logits, -1)[ids[t + 1]])
            if lean is not None:
                mine = lean.step(ids[t]).float() if t else logits
                lean_nll -= float(torch.log_softmax(mine, -1)[ids[t + 1]])
                agree += int(mine.argmax() == logits.argmax())
    n = len(ids) - 1
    native = os.environ.get("MOE_LOCAL_NATIVE", "1")
    print(f"MOE_LOCAL_NATIVE={native}: {n} tokens, perplexity {math.exp(nll / n):.4f} ({lm.model.dtype})")
    if lean is not None:
        print(f"lean decode step: perplexity {math.exp(lean_nll / n):.4f}, same top token {agree}/{n}")


if __name__ == "__main__":
    main()
