"""Generation in layers: ``generate_step`` -> ``stream_generate`` -> ``generate``.

``generate_step`` runs the model one token at a time over a KV cache; ``stream_generate``
turns tokens into text deltas with stop strings, EOS and stats; ``generate`` collects it.
Legend: P=prompt tokens, V=vocabulary size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from moe_local import seq2seq
from moe_local.config import SamplingParams
from moe_local.errors import MoeLocalError, PromptTooLongError
from moe_local.experts.store import StoreStats
from moe_local.lean.decoder import LeanDecoder
from moe_local.loading.loader import LoadedModel
from moe_local.prompt import Prompt, encode_prompt
from moe_local.sampling import LogitsProcessor, Sampler, sampler_from_params
from moe_local.seq2seq import is_encoder_decoder

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds activation memory on long prompts


@dataclass
class GenerationResponse:
    """One step of a streamed generation.

    Attributes:
        text: new text since the previous response (may be empty while a character or a
            possible stop string is incomplete).
        token: the token generated at this step (None on the final summary response).
        logprob: log-probability of ``token``.
        top_logprobs: the most likely (token, log-probability) pairs, when asked for.
        prompt_tokens: tokens in the prompt.
        generation_tokens: tokens generated so far.
        prompt_tps: prefill speed, tokens/s.
        generation_tps: decode speed so far, tokens/s.
        ttft_s: time to first token, seconds.
        finish_reason: None while running, then "stop" (EOS or stop string) or "length".
        experts: expert store counters accumulated during this generation.
    """

    text: str
    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    ttft_s: float = 0.0
    finish_reason: str | None = None
    experts: StoreStats = field(default_factory=StoreStats)


@dataclass
class GenerationResult:
    """A finished generation: the text and the last response's stats."""

    text: str
    tokens: list[int]
    finish_reason: str
    stats: GenerationResponse


def generate_step(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    sampler: Sampler,
    processors: Sequence[LogitsProcessor] = (),
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield tokens one at a time, forever (the caller stops it).

    An encoder-decoder model (Switch Transformers) encodes the prompt and decodes from its start
    token instead (``moe_local.seq2seq.generate_step``).

    Args:
        lm: the loaded model.
        prompt_ids: the prompt's token ids (at least one).
        sampler: picks a token from processed logits [V].
        processors: applied to the logits before sampling, with the tokens seen so far.

    Yields:
        (token, log-probabilities [V] of the processed logits).
    """
    if is_encoder_decoder(lm.model):  # the prompt is the encoder's input: ``moe_local.seq2seq``
        yield from seq2seq.generate_step(lm, prompt_ids, sampler, processors)
        return
    model = lm.model
    device = next(model.parameters()).device
    keyword, cache = cache_keyword(model), new_cache(model)
    seen = list(prompt_ids)
    ids = torch.tensor(seen, dtype=torch.long, device=device)  # [P]
    with torch.inference_mode():
        for start in range(0, len(seen), PREFILL_CHUNK):
            chunk = ids[start : start + PREFILL_CHUNK][None]
            out = model(input_ids=chunk, **{keyword: cache}, use_cache=True, logits_to_keep=1)
            cache = _returned_cache(out, cache)
        last = out.logits[0, -1]  # [V]
        lean = LeanDecoder.build(model, lm.context) if cache is not None else None
        if lean is not None:  # the decode steps without transformers' dispatch (same values)
            lean.start(cache)
            cache = out = None  # transformers' copy of the keys and values goes now, not at the end
        while True:
            logits = last.float().cpu()  # [V]
            for proc in processors:
                logits = proc(seen, logits)
            token = sampler(logits)
            yield token, torch.log_softmax(logits, dim=-1)
            seen.append(token)
            if lean is not None:
                last = lean.step(token)
                continue
            step = torch.tensor([[token]], dtype=torch.long, device=device)
            out = model(input_ids=step, **{keyword: cache}, use_cache=True, logits_to_keep=1)
            cache = _returned_cache(out, cache)
            last = out.logits[0, -1]


def cache_keyword(model) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers 5.24 on), else ``past_key_values``.

    Newer releases still accept the old name but log a deprecation line on every call.
    """
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model):
    """The cache transformers' own ``generate`` would start from: a ``DynamicCache`` of the text config.

    Families with their own cache class (MiniMax's linear attention) build it on the first forward
    when given None, as ``generate`` lets them; the returned one is then passed back.
    """
    from transformers import DynamicCache

    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return None
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return DynamicCache(config=text)


def _returned_cache(out, cache):
    if cache is not None:
        return cache
    returned = getattr(out, "cache", None)
    return returned if returned is not None else getattr(out, "past_key_values", None)


def stream_generate(
    lm: LoadedModel, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool | None = None
) -> Iterator[GenerationResponse]:
    """Generate, yielding a response per token with the new text and running stats.

    Args:
        lm: the loaded model.
        prompt: text, token ids, or chat messages.
        params: sampling and stopping options.
        chat: apply the chat template to a text prompt (None: when the tokenizer has one).

    Yields:
        GenerationResponse per token; the last one has ``finish_reason`` set.

    Raises:
        PromptTooLongError: the prompt leaves no room in the context.
    """
    params = params or SamplingParams()
    prompt_ids = encode_prompt(lm, prompt, chat)
    if not prompt_ids:
        raise MoeLocalError("the prompt is empty")
    if len(prompt_ids) >= lm.context:
        raise PromptTooLongError(len(prompt_ids), lm.context)
    yield from stream_from_steps(
        lm, prompt_ids, params, lambda sampler, procs: generate_step(lm, prompt_ids, sampler, procs)
    )


StepsFactory = Callable[[Sampler, list[LogitsProcessor]], Iterator[tuple[int, torch.Tensor]]]


def stream_from_steps(
    lm: LoadedModel, prompt_ids: Sequence[int], params: SamplingParams, make_steps: StepsFactory
) -> Iterator[GenerationResponse]:
    """``stream_generate``'s text, stop, EOS and stats layer over any source of tokens.

    ``stream_generate`` feeds it ``generate_step``; the server's batched decoding feeds it a step
    source whose logits come from a batch (``moe_local.batching``), so both stop, count and report
    a sequence the same way. A new step is asked for only while the budget lasts
    (``min(max_tokens, context - P)`` tokens): the source need not compute logits past it.

    Args:
        lm: the loaded model (its tokenizer, EOS ids, context and expert store).
        prompt_ids: the prompt's token ids (checked against the context already).
        params: sampling and stopping options.
        make_steps: ``make_steps(sampler, processors)`` returns the iterator of
            (token, log-probabilities [V]) that ``generate_step`` would yield.

    Yields:
        GenerationResponse per token; the last one has ``finish_reason`` set.
    """
    budget = min(params.max_tokens, lm.context - len(prompt_ids))
    sampler, procs = sampler_from_params(params)
    detok = _Detokenizer(lm.tokenizer, params.stop)
    before = lm.store.stats()
    t0 = t_first = time.perf_counter()
    ttft = prefill_tps = 0.0
    tokens: list[int] = []
    finish = "length"
    last = GenerationResponse(text="", token=None, prompt_tokens=len(prompt_ids))
    steps = make_steps(sampler, procs)
    try:
        for _ in range(budget):
            token, logprobs = next(steps)
            now = time.perf_counter()
            if not tokens:
                ttft, t_first = now - t0, now
                prefill_tps = len(prompt_ids) / ttft if ttft > 0 else 0.0
            if token in lm.eos_token_ids and not params.ignore_eos:
                finish = "stop"
                break
            tokens.append(token)
            text, stopped = detok.add(token)
            decode_s = now - t_first
            last = GenerationResponse(
                text=text,
                token=token,
                logprob=float(logprobs[token]),
                top_logprobs=_top(logprobs, params.logprobs),
                prompt_tokens=len(prompt_ids),
                generation_tokens=len(tokens),
                prompt_tps=prefill_tps,
                generation_tps=(len(tokens) - 1) / decode_s if decode_s > 0 else 0.0,
                ttft_s=ttft,
            )
            if stopped:
                finish = "stop"
                break
            yield last
    finally:
        steps.close()
    if detok.stopped:
        final = last  # carries the text up to the stop string, not yielded yet
    else:
        final = GenerationResponse(
            text=detok.flush(),
            token=None,
            prompt_tokens=len(prompt_ids),
            generation_tokens=len(tokens),
            prompt_tps=prefill_tps,
            generation_tps=last.generation_tps,
            ttft_s=ttft,
        )
        if detok.stopped:  # a stop string completed by the text held to the end
            finish = "stop"
    final.finish_reason = finish
    final.experts = lm.store.stats().minus(before)
    yield final


def generate(
    lm: LoadedModel, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool | None = None
) -> GenerationResult:
    """Generate a whole completion.

    Args:
        lm: the loaded model.
        prompt: text, token ids, or chat messages.
        params: sampling and stopping options.
        chat: apply the chat template to a text prompt (None: when the tokenizer has one).

    Returns:
        The text, the generated tokens, why it stopped, and the final stats.
    """
    parts, tokens = [], []
    resp = None
    for resp in stream_generate(lm, prompt, params, chat=chat):
        parts.append(resp.text)
        if resp.token is not None:
            tokens.append(resp.token)
    assert resp is not None  # stream_generate always yields a final response
    return GenerationResult("".join(parts), tokens, resp.finish_reason or "length", resp)


def _top(logprobs: torch.Tensor, n: int) -> list[tuple[int, float]]:
    if n <= 0:
        return []
    vals, idx = torch.topk(logprobs, n)
    return [(int(i), float(v)) for i, v in zip(idx, vals, strict=True)]


class _Detokenizer:
    """Incremental detokenization with stop strings: emits only text that is final.

    Each token costs a decode of a few tokens (``IncrementalDecoder``), and only the text not yet
    shown (``pending``: at most a stop string's length plus the newest piece) is searched: a stop
    string cannot start in text already shown, since any text that could begin one is held back.
    """

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        from moe_local.detokenize import IncrementalDecoder

        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.stopped = False

    def add(self, token: int) -> tuple[str, bool]:
        """Add a token; return (text now safe to show, whether a stop string was hit)."""
        if self.decoder is None:
            return "", False
        piece = self.decoder.step(token)
        if not piece:
            return "", False  # an incomplete UTF-8 character, or a skipped special token
        text = self.pending + piece
        hits = [pos for pos in (text.find(s) for s in self.stop) if pos != -1]
        if hits:
            self.pending = ""
            self.stopped = True
            return text[: min(hits)], True
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """Return any text held back (a partial stop string that never completed)."""
        text = self.pending + (self.decoder.flush() if self.decoder is not None else "")
        self.pending = ""
        hits = [pos for pos in (text.find(s) for s in self.stop) if pos != -1]
        if hits:
            self.stopped = True
            return text[: min(hits)]
        return text
