"""``eval``: perplexity of a model on a text file, and how fast it was scored.

The text is tokenized once and cut into consecutive, non-overlapping windows of ``context``
tokens (stride = context). Two ways to score a window (``score``):

* ``"all"`` (default): every token from the window's second on, so each token is predicted from
  at most ``context - 1`` tokens before it; a last, shorter window is scored too.
* ``"second-half"``: only the tokens after the window's middle, each predicted from at least
  ``context // 2`` tokens: what ``llama-perplexity -c CONTEXT`` reports (it scores positions
  ``context // 2 + 1 .. context - 1`` of every full window and drops a last, shorter one), so
  the two engines' figures compare on the same token stream.

Perplexity is exp of the mean negative log-likelihood over all scored tokens.
Legend: W=window tokens, V=vocabulary size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_local.errors import MoeLocalError
from moe_local.loading.loader import LoadedModel

SCORES = ("all", "second-half")  # how a window is scored (see the module docstring)


@dataclass(frozen=True)
class EvalResult:
    """Perplexity and speed of one model on one text."""

    model: str
    perplexity: float
    tokens: int  # tokens scored
    tokens_per_s: float
    hit_rate: float  # expert cache hit rate while scoring
    context: int  # window length used (capped at the model's context)
    score: str = "all"  # "all" or "second-half" (see the module docstring)


def check_score(score: str) -> str:
    """``score`` when it is one of ``SCORES``.

    Raises:
        MoeLocalError: any other value (one line naming the choices).
    """
    if score not in SCORES:
        raise MoeLocalError(f"unknown --score {score!r}; choose {' or '.join(SCORES)}")
    return score


def perplexity(
    lm: LoadedModel,
    text: str,
    *,
    context: int = 512,
    max_tokens: int | None = None,
    score: str = "all",
) -> EvalResult:
    """Score ``text`` with ``lm``.

    Args:
        lm: the loaded model.
        text: the text to score.
        context: window length in tokens.
        max_tokens: use at most this many tokens from the start of the text.
        score: ``"all"`` tokens of each window, or its ``"second-half"`` (as llama-perplexity).

    Returns:
        The perplexity, the number of tokens scored, tokens/s and the expert hit rate.

    Raises:
        MoeLocalError: a bad context, score or max_tokens, too short a text, or an encoder-decoder.
    """
    check_score(score)
    if getattr(lm.model.config, "is_encoder_decoder", False):
        family = getattr(lm.model.config, "model_type", "this model")
        raise MoeLocalError(
            f"eval scores next-token perplexity of decoder-only models; {family} is an encoder-decoder"
        )
    if context < 2:
        raise MoeLocalError("--context must be at least 2")
    ids = list(lm.tokenizer.encode(text))
    if max_tokens is not None:
        if max_tokens < 2:
            raise MoeLocalError(f"max_tokens must be at least 2 (a token scores the next), not {max_tokens}")
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise MoeLocalError("the text has fewer than 2 tokens")
    context = min(context, lm.context)
    if score == "second-half" and len(ids) < context:
        raise MoeLocalError(
            f"--score second-half scores full windows only: the text has {len(ids)} tokens, "
            f"fewer than one window of {context}; give more text or a smaller --context"
        )
    before = lm.store.stats()
    t0 = time.perf_counter()
    nll, scored = window_nll(lm.model, torch.tensor(ids), context, score=score)
    seconds = time.perf_counter() - t0
    stats = lm.store.stats().minus(before)
    ppl = math.exp(nll / scored)
    return EvalResult(lm.name, ppl, scored, scored / seconds, stats.hit_rate, context, score)


@torch.inference_mode()
def window_nll(
    model, ids: torch.Tensor, context: int, batch: int = 1, score: str = "all"
) -> tuple[float, int]:
    """Summed negative log-likelihood of ``ids`` in consecutive, non-overlapping windows.

    With ``score="all"`` each window of ``context`` tokens is scored from its second token on and
    a last, shorter window is scored alone (one of a single token adds nothing). With
    ``score="second-half"`` only full windows count, each from token ``context // 2 + 1`` on
    (``context - 1 - context // 2`` tokens a window, as ``llama-perplexity``).

    Args:
        model: a transformers causal LM (``LoadedModel.model`` or any other).
        ids: 1-D token ids.
        context: window length.
        batch: full windows per forward pass (speed only; the result is the same).
        score: ``"all"`` or ``"second-half"``.

    Returns:
        (summed NLL, tokens scored).
    """
    check_score(score)
    device = next(model.parameters()).device
    full = len(ids) // context
    rows = [ids[: full * context].reshape(full, context)[i : i + batch] for i in range(0, full, batch)]
    # a logit at position p predicts token p + 1; "second-half" keeps predictions from the middle on
    first = 0 if score == "all" else context // 2
    if score == "all" and len(ids) - full * context >= 2:
        rows.append(ids[full * context :][None])
    nll, scored = 0.0, 0
    for x in rows:  # [B, W]
        x = x.to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, first:-1].float()  # [B, W-1-first, V]
        target = x[:, first + 1 :]
        nll += float(
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        )
        scored += target.numel()
    return nll, scored


def read_text_file(path: str | Path) -> str:
    """The text to score, or one line saying why it cannot be read (checked before any model loads).

    Raises:
        MoeLocalError: missing, a folder, unreadable, or empty.
    """
    try:
        text = Path(path).read_text(errors="replace")
    except IsADirectoryError as exc:
        raise MoeLocalError(f"--text {path} is a folder; give a plain-text file") from exc
    except OSError as exc:
        raise MoeLocalError(f"cannot read --text {path}: {exc.strerror}") from exc
    if not text.strip():
        raise MoeLocalError(f"--text {path} is empty: nothing to score")
    return text


def evaluate_file(lm: LoadedModel, path: str | Path, **kwargs) -> EvalResult:
    """``perplexity`` of the text in ``path``."""
    return perplexity(lm, read_text_file(path), **kwargs)
