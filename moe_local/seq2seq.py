"""Encoder-decoder generation (Switch Transformers): the prompt is encoded once, the decoder generates.

``generate_step`` runs the encoder over the whole prompt once and keeps its outputs; the decoder
starts from the config's ``decoder_start_token_id`` and decodes one token at a time over its own
``EncoderDecoderCache`` (self-attention keys and values grow each step; the cross-attention ones
are computed from the encoder outputs on the first step and reused), exactly the calls
transformers' own ``generate`` makes for an encoder-decoder model. ``moe_local.generation``
calls it for a model whose config says ``is_encoder_decoder``; its text, stop and stats layer
(``stream_from_steps``) is the decoder-only one.
Legend: P=prompt tokens, V=vocabulary size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from moe_local.errors import MoeLocalError
from moe_local.loading.loader import LoadedModel
from moe_local.sampling import LogitsProcessor, Sampler


def is_encoder_decoder(model) -> bool:
    """Whether ``model`` (a transformers model) is an encoder-decoder."""
    return bool(getattr(model.config, "is_encoder_decoder", False))


def decoder_start_token(model) -> int:
    """The token the decoder starts from: the generation config's, else the model config's.

    Raises:
        MoeLocalError: neither names one.
    """
    for source in (getattr(model, "generation_config", None), model.config):
        token = getattr(source, "decoder_start_token_id", None) if source is not None else None
        if isinstance(token, int) and not isinstance(token, bool):
            return token
    raise MoeLocalError(
        f"{model.config.model_type} config has no decoder_start_token_id to start decoding from"
    )


def new_cache(model):
    """The cache transformers' ``generate`` starts an encoder-decoder from: self- and cross-attention."""
    from transformers import DynamicCache, EncoderDecoderCache

    text = model.config.get_text_config(decoder=True)
    return EncoderDecoderCache(DynamicCache(config=text), DynamicCache(config=text))


def generate_step(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    sampler: Sampler,
    processors: Sequence[LogitsProcessor] = (),
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield the decoder's tokens one at a time, forever (the caller stops it).

    Args:
        lm: the loaded encoder-decoder model.
        prompt_ids: the encoder's input token ids (at least one).
        sampler: picks a token from processed logits [V].
        processors: applied to the logits before sampling, with the tokens seen so far (the
            prompt, then the tokens generated: the same list a decoder-only model gives them).

    Yields:
        (token, log-probabilities [V] of the processed logits).
    """
    from moe_local.generation import cache_keyword

    model = lm.model
    device = next(model.parameters()).device
    keyword, cache = cache_keyword(model), new_cache(model)
    seen = list(prompt_ids)
    ids = torch.tensor([seen], dtype=torch.long, device=device)  # [1, P]
    mask = torch.ones_like(ids)  # [1, P]: the encoder outputs every decoder step attends to
    step = torch.tensor([[decoder_start_token(model)]], dtype=torch.long, device=device)
    with torch.inference_mode():
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
        while True:
            out = model(
                encoder_outputs=encoded,
                attention_mask=mask,
                decoder_input_ids=step,
                **{keyword: cache},
                use_cache=True,
            )
            logits = out.logits[0, -1].float().cpu()  # [V]
            for proc in processors:
                logits = proc(seen, logits)
            token = sampler(logits)
            yield token, torch.log_softmax(logits, dim=-1)
            seen.append(token)
            step = torch.tensor([[token]], dtype=torch.long, device=device)


def teacher_forced(model, ids: torch.Tensor):
    """One forward that routes ``ids`` [1, L] through every sparse layer, encoder and decoder alike.

    The encoder reads ``ids``; the decoder reads them shifted right behind its start token, as in
    training. A decoder-only forward (``model(input_ids=...)``) is what calibration runs for other
    families; an encoder-decoder needs both inputs.

    Returns:
        The model's output (logits [1, L, V]).
    """
    start = ids.new_full((ids.shape[0], 1), decoder_start_token(model))
    decoder_ids = torch.cat([start, ids[:, :-1]], dim=1)  # [1, L]
    return model(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False)
