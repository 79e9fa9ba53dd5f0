"""Decoding several sequences in one forward pass: a left-padded batch over per-sequence KV caches.

Each sequence is prefilled alone (batch 1, its own ``DynamicCache``, exactly as ``generate_step``
does), then joins the batch: every layer's keys and values are stacked along the batch dimension,
the shorter side padded on the left so that every sequence's newest token sits in the last column.
A decode step feeds one token per sequence with its own position (``position_ids`` [B, 1]) and an
attention mask [B, W+1] that hides each row's padding; a sequence that leaves is dropped from the
batch and the columns no row needs any more are cut. One forward pass then routes every
sequence's token through each MoE layer together, so an expert the store loads once serves every
sequence routed to it (``OffloadedExperts`` groups a batch's tokens by expert).

Numerics: the padded columns get exactly zero attention weight, but a batched matmul may sum in a
different order than a batch-1 one, so outputs can differ from a lone run in the last bits (the
tests check token identity on float32 tiny models). Families whose cache is not made of plain
full-attention layers (sliding windows, linear attention, MiniMax's own cache) and encoder-decoder
models (Switch Transformers) are not batched:
``batch_support`` says why, and the server decodes them one at a time.
Models the lean decode step computes (``moe_local.lean``) are batched by ``LeanBatch`` instead
(``new_batch`` picks): no padding, each sequence's own cache, each row's logits those of decoding
it alone.
Legend: B=sequences in the batch, W=padded length, P=prompt tokens, V=vocabulary size.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from moe_local.generation import PREFILL_CHUNK, _returned_cache, cache_keyword, new_cache
from moe_local.lean.batch import LeanBatch
from moe_local.lean.decoder import LeanDecoder
from moe_local.loading.loader import LoadedModel
from moe_local.sampling import LogitsProcessor, Sampler
from moe_local.seq2seq import is_encoder_decoder

ATTENTION = frozenset({"sdpa", "eager"})  # implementations whose padding mask is exact
# transformers 5.24's DeepSeek-V2/V3 (MLA) attention fails on any padding mask with a batch over 1
UNBATCHED = {"deepseek_v2": "DeepSeek-V2", "deepseek_v3": "DeepSeek-V3", "kimi_k2": "Kimi-K2"}


def batch_support(lm: LoadedModel) -> str | None:
    """Whether ``lm``'s sequences can be decoded in one batch.

    Returns:
        None when they can; else why not, in a few words (for a log line).
    """
    from transformers.cache_utils import DynamicLayer

    model = lm.model
    if LeanDecoder.computes(model):
        return None  # the lean batch: each sequence prefilled alone, decoded unpadded (any attention)
    family = getattr(model.config, "model_type", "")
    if is_encoder_decoder(model):
        return "an encoder-decoder model's decoding is not batched here"
    if family in UNBATCHED:
        return f"transformers' {UNBATCHED[family]} attention cannot take a padded batch"
    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    if attention not in ATTENTION:
        return f"its attention implementation {attention!r} is not batched here"
    cache = new_cache(model)
    if cache is None:
        return "its family keeps a cache of its own"
    layers = getattr(cache, "layers", None)
    if not layers:
        return "its cache has no layers to stack"
    odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if odd:
        return f"its cache has {', '.join(sorted(odd))} layers (sliding window or linear attention)"
    return None


def new_batch(lm: LoadedModel) -> DecodeBatch | LeanBatch:
    """An empty decode batch for ``lm``: the lean step's where it computes the model, else the padded one.

    The lean batch gives each sequence the logits of decoding it alone and skips transformers'
    forward (``moe_local.lean.batch``); ``MOE_LOCAL_LEAN=0`` keeps the padded batch.
    """
    decoder = LeanDecoder.build(lm.model, lm.context)
    return DecodeBatch(lm) if decoder is None else LeanBatch(decoder)


def prefill(lm: LoadedModel, prompt_ids: Sequence[int]) -> tuple[object, torch.Tensor]:
    """Run a prompt alone, as ``generate_step`` does: its cache and the logits [V] of its last token."""
    model = lm.model
    device = next(model.parameters()).device
    keyword, cache = cache_keyword(model), new_cache(model)
    ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)  # [P]
    with torch.inference_mode():
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[start : start + PREFILL_CHUNK][None]
            out = model(input_ids=chunk, **{keyword: cache}, use_cache=True, logits_to_keep=1)
            cache = _returned_cache(out, cache)
    return cache, out.logits[0, -1].float().cpu()


class DecodeBatch:
    """The sequences decoding together, and their left-padded batched KV cache.

    Sequences are named by any hashable key. ``join`` one after its ``prefill``, call ``step``
    with each sequence's newest token, and ``leave`` when it ends.

    Args:
        lm: the loaded model (``batch_support(lm)`` must be None).
    """

    def __init__(self, lm: LoadedModel) -> None:
        self.model = lm.model
        self.device = next(self.model.parameters()).device
        self.keyword = cache_keyword(self.model)
        self.keys: list[Hashable] = []
        self.lengths: list[int] = []  # real tokens in each row's cache
        self.pads: list[int] = []  # padding columns on each row's left
        self.cache: object | None = None
        self.width = 0  # columns of the batched cache: pads[i] + lengths[i] for every row

    def __len__(self) -> int:
        return len(self.keys)

    def _layers(self, cache: object) -> list:
        return [layer for layer in cache.layers if layer.is_initialized]  # type: ignore[attr-defined]

    def join(self, key: Hashable, cache: object, length: int) -> None:
        """Add a prefilled sequence (its batch-1 cache of ``length`` tokens) to the batch."""
        if key in self.keys:
            raise ValueError(f"sequence {key!r} is already in the batch")
        if self.cache is None:
            self.keys, self.lengths, self.pads = [key], [length], [0]
            self.cache, self.width = cache, length
            return
        width = max(self.width, length)
        grow, pad = width - self.width, width - length
        for mine, theirs in zip(self._layers(self.cache), self._layers(cache), strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, grow), _left_pad(theirs.keys, pad)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, grow), _left_pad(theirs.values, pad)], dim=0)
        self.pads = [p + grow for p in self.pads] + [pad]
        self.keys.append(key)
        self.lengths.append(length)
        self.width = width

    def leave(self, key: Hashable) -> None:
        """Drop a sequence; cut the columns that only its row needed."""
        row = self.keys.index(key)
        if len(self.keys) == 1:
            self.keys, self.lengths, self.pads, self.cache, self.width = [], [], [], None, 0
            return
        keep = [i for i in range(len(self.keys)) if i != row]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.keys = [self.keys[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        self.pads = [self.pads[i] for i in keep]
        cut = min(self.pads)
        for layer in self._layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[..., cut:, :]
            layer.values = layer.values.index_select(0, index)[..., cut:, :]
        self.pads = [p - cut for p in self.pads]
        self.width -= cut

    def step(self, tokens: Mapping[Hashable, int]) -> dict[Hashable, torch.Tensor]:
        """Feed each sequence its newest token; return each one's next logits [V] (float32, CPU).

        Args:
            tokens: a token for every sequence in the batch, by key.
        """
        ids = torch.tensor([[tokens[k]] for k in self.keys], dtype=torch.long, device=self.device)  # [B, 1]
        positions = torch.tensor([[n] for n in self.lengths], dtype=torch.long, device=self.device)  # [B, 1]
        columns = torch.arange(self.width + 1, device=self.device)[None]  # [1, W+1]
        pads = torch.tensor(self.pads, dtype=torch.long, device=self.device)[:, None]  # [B, 1]
        mask = (columns >= pads).long()  # [B, W+1]: 0 on each row's padding
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                **{self.keyword: self.cache},
                use_cache=True,
                logits_to_keep=1,
            )
        self.width += 1
        self.lengths = [n + 1 for n in self.lengths]
        logits = out.logits[:, -1].float().cpu()  # [B, V]
        return {k: logits[i] for i, k in enumerate(self.keys)}


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` [B, H, L, D] with ``n`` zero columns before its sequence dimension."""
    return F.pad(t, (0, 0, n, 0)) if n else t


class LogitsBox:
    """Where a sequence's next logits wait for its step source (filled by the batch, taken once)."""

    def __init__(self) -> None:
        self._logits: torch.Tensor | None = None

    def put(self, logits: torch.Tensor) -> None:
        """Leave the logits [V] of the sequence's next token."""
        self._logits = logits

    def take(self) -> torch.Tensor:
        """The logits left by ``put`` (a bug in the scheduler if none are there)."""
        if self._logits is None:
            raise RuntimeError("the batch has not computed this sequence's logits")
        logits, self._logits = self._logits, None
        return logits


def batched_steps(
    first: Callable[[], torch.Tensor],
    box: LogitsBox,
    prompt_ids: Sequence[int],
    sampler: Sampler,
    processors: Sequence[LogitsProcessor] = (),
) -> Iterator[tuple[int, torch.Tensor]]:
    """What ``generate_step`` yields, with the model run elsewhere: the first logits from ``first``
    (the prefill), each later one from ``box`` (the batch), processed and sampled the same way.

    Yields:
        (token, log-probabilities [V] of the processed logits).
    """
    seen = list(prompt_ids)
    logits = first()
    while True:
        for proc in processors:
            logits = proc(seen, logits)
        token = sampler(logits)
        yield token, torch.log_softmax(logits, dim=-1)
        seen.append(token)
        logits = box.take()
