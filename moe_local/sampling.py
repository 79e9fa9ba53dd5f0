"""Samplers and logits processors, made by verb-first factories.

A sampler maps logits [V] to one token id; a logits processor maps (tokens so far, logits)
to new logits. ``GuidedParams`` carries a request's own processors (a grammar mask, see
``moe_local.grammar``) through code that only takes ``SamplingParams``; they run after the
penalties, so a masked token stays masked. Legend: V=vocabulary size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moe_local.config import SamplingParams

Sampler = Callable[[torch.Tensor], int]
LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


def make_sampler(
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> Sampler:
    """Make a sampler: greedy at temperature 0, else temperature with top-k, top-p and min-p filters.

    Args:
        temperature: softmax temperature; 0 picks the most likely token.
        top_p: keep the smallest set of tokens whose probability reaches top_p.
        top_k: keep the k most likely tokens (0: all).
        min_p: drop tokens whose probability is below min_p times the top one.
        seed: seed for a private generator, so a request's sampling is reproducible.

    Returns:
        A function logits [V] -> token id.
    """
    if temperature < 1e-5:  # below this, float32 softmax overflows: greedy is the limit anyway
        return lambda logits: int(torch.argmax(logits))
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()

    def sample(logits: torch.Tensor) -> int:
        probs = torch.softmax(logits.float() / temperature, dim=-1)  # [V]
        probs, order = torch.sort(probs, descending=True)
        keep = torch.ones_like(probs, dtype=torch.bool)
        if top_k > 0:
            keep[top_k:] = False
        if top_p < 1.0:
            cum = torch.cumsum(probs, dim=-1)
            keep &= (cum - probs) < top_p  # a token stays while the mass before it is below top_p
        if min_p > 0:
            keep &= probs >= min_p * probs[0]
        keep[0] = True
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        if (
            not torch.isfinite(probs).all() or probs.sum() <= 0
        ):  # degenerate logits: fall back to the top token
            return int(order[0])
        choice = torch.multinomial(probs / probs.sum(), 1, generator=gen)
        return int(order[choice])

    return sample


def make_logits_processors(
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> list[LogitsProcessor]:
    """Make the processors for the penalties that are switched on.

    Args:
        repetition_penalty: CTRL-style: divide positive logits of seen tokens by it (multiply negative ones).
        presence_penalty: subtract once from every token that appeared.
        frequency_penalty: subtract per occurrence of each token.

    Returns:
        The processors, in order.
    """
    procs: list[LogitsProcessor] = []
    if repetition_penalty != 1.0:

        def repetition(tokens: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
            if not tokens:
                return logits
            idx = torch.tensor(sorted(set(tokens)), dtype=torch.long)
            picked = logits[idx]
            logits = logits.clone()
            logits[idx] = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
            return logits

        procs.append(repetition)
    if presence_penalty or frequency_penalty:

        def penalties(tokens: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
            if not tokens:
                return logits
            counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=logits.shape[-1])
            counts = counts[: logits.shape[-1]].to(logits.dtype)
            return logits - frequency_penalty * counts - presence_penalty * (counts > 0).to(logits.dtype)

        procs.append(penalties)
    return procs


@dataclass(frozen=True)
class GuidedParams(SamplingParams):
    """``SamplingParams`` plus processors of the request's own, run last (e.g. a grammar mask).

    The processors may keep state across the generation (a grammar follows the tokens sampled),
    so one ``GuidedParams`` serves one generation.

    Attributes:
        processors: applied in order after the penalties.
    """

    processors: tuple[LogitsProcessor, ...] = ()


def sampler_from_params(params: SamplingParams) -> tuple[Sampler, list[LogitsProcessor]]:
    """Make the sampler and processors a request's SamplingParams ask for (``GuidedParams``' last)."""
    sampler = make_sampler(params.temperature, params.top_p, params.top_k, params.min_p, params.seed)
    procs = make_logits_processors(
        params.repetition_penalty, params.presence_penalty, params.frequency_penalty
    )
    procs.extend(getattr(params, "processors", ()))
    return sampler, procs
