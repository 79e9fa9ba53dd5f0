"""``eval``: perplexity of a model on a text file, and how fast it was scored.

The text is tokenized once and cut into consecutive, non-overlapping windows of ``context``
tokens (stride = context); every window is scored from its second token on, so each token is
predicted from at most ``context - 1`` tokens before it. Perplexity is exp of the mean
negative log-likelihood over all scored tokens.
Legend: W=window tokens, V=vocabulary size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_local.errors import MoeLocalError
from moe_local.loading.loader import LoadedModel


@dataclass(frozen=True)
class EvalResult:
    """Perplexity and speed of one model on one text."""

    model: str
    perplexity: float
    tokens: int  # tokens scored
    tokens_per_s: float
    hit_rate: float  # expert cache hit rate while scoring
    context: int  # window length used (capped at the model's context)


def perplexity(
    lm: LoadedModel, text: str, *, context: int = 512, max_tokens: int | None = None
) -> EvalResult:
    """Score ``text`` with ``lm``.

    Args:
        lm: the loaded model.
        text: the text to score.
        context: window length in tokens.
        max_tokens: score at most this many tokens from the start of the text.

    Returns:
        The perplexity, the number of tokens scored, tokens/s and the expert hit rate.
    """
    if context < 2:
        raise MoeLocalError("--context must be at least 2")
    ids = list(lm.tokenizer.encode(text))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise MoeLocalError("the text has fewer than 2 tokens")
    context = min(context, lm.context)
    before = lm.store.stats()
    nll, scored = 0.0, 0
    t0 = time.perf_counter()
    device = next(lm.model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(ids), context):
            window = ids[start : start + context]
            if len(window) < 2:
                break
            x = torch.tensor([window], device=device)  # [1, W]
            logits = lm.model(input_ids=x, use_cache=False).logits[0, :-1].float()  # [W-1, V]
            target = x[0, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            scored += len(window) - 1
    seconds = time.perf_counter() - t0
    stats = lm.store.stats().minus(before)
    return EvalResult(lm.name, math.exp(nll / scored), scored, scored / seconds, stats.hit_rate, context)


def evaluate_file(lm: LoadedModel, path: str | Path, **kwargs) -> EvalResult:
    """``perplexity`` of the text in ``path``."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        raise MoeLocalError(f"cannot read {path}: {exc.strerror}") from exc
    return perplexity(lm, text, **kwargs)
