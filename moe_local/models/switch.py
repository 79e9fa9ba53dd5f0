"""Switch Transformers (google/switch-base-8 ... switch-c-2048) with experts on the experts interface.

transformers defines the family (``SwitchTransformersForConditionalGeneration``, a T5 encoder-decoder
whose every other feed-forward is a top-1 MoE), but keeps each sparse layer's experts as a
``ModuleDict`` of ``expert_{i}`` dense MLPs (``wi`` [I, H], ``wo`` [H, I]). ``SwitchForConditionalGeneration``
is transformers' own class with two replacements:

- each sparse feed-forward's ``mlp`` is a ``SwitchSparseMLP``: transformers' own
  ``SwitchTransformersTop1Router`` (float32 softmax, argmax, the per-sequence ``expert_capacity``
  past which a token gets no expert), then ``SwitchExperts``, the same experts fused on
  transformers' experts interface (``up_proj`` [E, I, H], ``down_proj`` [E, H, I], ungated), so
  moe-local's expert swap, offload and quantization apply to the encoder's and the decoder's
  sparse layers unchanged;
- each dense one is a ``SwitchDenseMLP``: the same computation, with a ``wo`` that may be quantized.

Everything else (attention with relative position buckets, the scale-only layer norm, the
tied-embedding output scale, ``EncoderDecoderCache``) is transformers' code.

Checkpoint keys are the released ones (``encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight``,
``decoder.block.1.layer.2.mlp.router.classifier.weight``); ``CONVERSION`` renames the per-expert
ones to ``experts.{e}.up_proj``/``down_proj`` (what moe-local's expert readers match) and fuses them
for transformers' own loader. It is registered under this class's name only, so transformers'
own Switch class keeps loading its checkpoints as before.

This is not a family of the ``moe_local.models`` registry (no ``MODEL_TYPE``): transformers
defines the config; ``moe_local.loading.meta`` builds this class for ``switch_transformers``.
Legend: T=tokens, E=experts, H=hidden size (d_model), I=expert intermediate size (d_ff).
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.core_model_loading import MergeModulelist, WeightConverter, WeightRenaming
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersDenseActDense,
    SwitchTransformersForConditionalGeneration,
    SwitchTransformersSparseMLP,
    SwitchTransformersTop1Router,
)

DROPPED = -1  # the expert index of a token the router dropped (past the expert capacity)


class SwitchExperts(nn.Module):
    """E ungated experts, fused: ``up_proj`` [E, I, H] (each ``wi``), ``down_proj`` [E, H, I] (each ``wo``).

    Args:
        config: the Switch config (``num_experts``, ``d_model``, ``d_ff``, ``dense_act_fn``).
        moe_layer: the unique index moe-local's expert store knows this layer by (encoder blocks
            first, then the decoder's after them: the two stacks number their blocks from 0 each).
    """

    has_gate = False
    has_bias = False
    is_transposed = False
    is_concatenated = True

    def __init__(self, config, moe_layer: int) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.moe_layer = moe_layer
        self.up_proj = nn.Parameter(torch.empty(config.num_experts, config.d_ff, config.d_model))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, config.d_model, config.d_ff))
        self.act_fn = ACT2FN[config.dense_act_fn]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """[T, H] tokens, [T, 1] expert ids (``DROPPED``: none) and weights -> [T, H] expert outputs."""
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            if not 0 <= e < self.num_experts:
                continue  # a dropped token: its feed-forward adds nothing (the residual carries it)
            token, slot = torch.where(top_k_index == e)
            h = self.act_fn(nn.functional.linear(hidden_states[token], self.up_proj[e]))  # [n, I]
            y = nn.functional.linear(h, self.down_proj[e])  # [n, H]
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


class SwitchSparseMLP(nn.Module):
    """transformers' top-1 router, then ``SwitchExperts`` given each token's expert as an index.

    The router returns a one-hot dispatch mask with the tokens past an expert's capacity zeroed;
    such a token gets the index ``DROPPED``, which the experts skip, as transformers' own loop does.
    """

    def __init__(self, config, moe_layer: int) -> None:
        super().__init__()
        self.router = SwitchTransformersTop1Router(config)
        self.experts = SwitchExperts(config, moe_layer)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape  # [B, S, H]: capacity is counted per sequence
        dispatch, probs, _ = self.router(hidden_states)  # [B, S, E] one-hot (or zero), [B, S, 1]
        dispatch = dispatch.reshape(-1, dispatch.shape[-1])  # [T, E]
        index = torch.where(dispatch.any(dim=-1), dispatch.argmax(dim=-1), DROPPED)[:, None]  # [T, 1]
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        return self.experts(x, index, probs.reshape(-1, 1)).reshape(shape)


class SwitchDenseMLP(SwitchTransformersDenseActDense):
    """transformers' dense feed-forward (``wi``, activation, ``wo``), whose ``wo`` may be quantized.

    transformers' forward reads ``wo.weight`` to cast the activations to its dtype; a quantized
    ``wo`` (moe-local's ``QuantLinear``) has no such tensor and takes any activation dtype.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.act(self.wi(hidden_states)))
        weight = getattr(self.wo, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype not in (h.dtype, torch.int8):
            h = h.to(weight.dtype)  # as transformers does for a wo kept in another dtype
        return self.wo(h)


class SwitchForConditionalGeneration(SwitchTransformersForConditionalGeneration):
    """transformers' Switch encoder-decoder; feed-forwards ``SwitchSparseMLP`` and ``SwitchDenseMLP``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        for layer, ff in sparse_feed_forwards(self):
            ff.mlp = SwitchSparseMLP(config, layer)
        for stack in (self.encoder, self.decoder):
            for block in stack.block:
                ff = block.layer[-1]
                if isinstance(ff.mlp, SwitchTransformersDenseActDense):
                    ff.mlp = SwitchDenseMLP(config)


def sparse_feed_forwards(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """Each sparse feed-forward layer (``block.N.layer.M``) of a Switch model, with its unique MoE index.

    Encoder block ``n`` is index ``n``; decoder block ``n`` is ``num_layers + n``.
    """
    found = []
    offset = {"encoder": 0, "decoder": model.config.num_layers}
    for stack, base in offset.items():
        for n, block in enumerate(getattr(model, stack).block):
            ff = block.layer[-1]
            if isinstance(ff.mlp, SwitchTransformersSparseMLP | SwitchSparseMLP):
                found.append((base + n, ff))
    return found


CONVERSION = [
    WeightRenaming(r"mlp\.experts\.expert_(\d+)\.wi\.", r"mlp.experts.\1.up_proj."),
    WeightRenaming(r"mlp\.experts\.expert_(\d+)\.wo\.", r"mlp.experts.\1.down_proj."),
    WeightConverter(
        source_patterns="mlp.experts.*.up_proj.weight",
        target_patterns="mlp.experts.up_proj",
        operations=[MergeModulelist(dim=0)],
    ),
    WeightConverter(
        source_patterns="mlp.experts.*.down_proj.weight",
        target_patterns="mlp.experts.down_proj",
        operations=[MergeModulelist(dim=0)],
    ),
]

_lock = threading.Lock()
_registered = False


def register_switch() -> None:
    """Register ``CONVERSION`` for ``SwitchForConditionalGeneration`` (by class name), once."""
    global _registered
    with _lock:
        if _registered:
            return
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping

        register_checkpoint_conversion_mapping(
            SwitchForConditionalGeneration.__name__, list(CONVERSION), overwrite=True
        )
        _registered = True
