"""The lean decode step: one token through a Mixtral-structured model without transformers' dispatch.

transformers' forward for one token spends about as much time in module calls, mask and cache
bookkeeping and 5-15 small torch ops per norm, rotary embedding, attention and router as in the
matrix-vector products themselves (8 of 19 ms a token on the 8-layer benchmark model). This step
computes the same layer with one native call per small operation (``moe_local.lean.ops``), the
projections on the weights' own kernels, and the experts through the same ``OffloadedExperts``
(cache, prefetch, statistics and trace unchanged). The prompt still runs through transformers'
forward; its keys and values are then copied once into a preallocated cache (``LeanCache``).

The values equal transformers' bf16 forward up to the order of float32 sums in attention, router and
norms (bounded in ``tests/lean/test_decoder.py``). Only models whose every layer has exactly
Mixtral's structure take this path (``LeanDecoder.build`` says why not, in the debug log);
``MOE_LOCAL_LEAN=0`` turns it off.

Legend: H hidden size, D head size, Hq query heads, Hkv key/value heads, V vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moe_local import env
from moe_local.experts.module import OffloadedExperts
from moe_local.lean import ops
from moe_local.quant import native

log = logging.getLogger(__name__)

Projection = Callable[[torch.Tensor], torch.Tensor]  # [1, I] bf16 -> [1, O] bf16


def _projection(module: nn.Module) -> Projection:
    """The cheapest call computing ``module(x)`` for one bf16 row: the weight's kernel when it has one."""
    from moe_local.quant.linear import QuantLinear

    if isinstance(module, QuantLinear) and module.bias is None:
        fast = getattr(module.quantized(), "native_weight", lambda: None)()
        if fast is not None:
            return fast.linear_bf16
    if type(module) is nn.Linear and module.bias is None and module.weight.dtype is torch.bfloat16:
        weight = module.weight
        if native.available():
            return lambda x: native.dense_bf16(x, weight)
    return module


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's pieces, resolved once per generation."""

    norm1: torch.Tensor  # [H] bf16
    eps1: float
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    norm2: torch.Tensor
    eps2: float
    router: ops.Router
    experts: OffloadedExperts


class LeanCache:
    """Keys and values of every layer in preallocated bf16 buffers [Hkv, capacity, D], grown by doubling.

    Args:
        layers: decoder layers.
        kv_heads: key/value heads.
        head_dim: D.
        capacity: positions to make room for at first.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int) -> None:
        self.length = 0
        shape = (kv_heads, max(capacity, 16), head_dim)
        self.keys = [torch.empty(shape, dtype=torch.bfloat16) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=torch.bfloat16) for _ in range(layers)]

    @property
    def capacity(self) -> int:
        """Positions the buffers hold."""
        return self.keys[0].shape[1]

    def reserve(self, positions: int) -> None:
        """Make room for ``positions`` positions (copying into buffers twice as large when needed)."""
        if positions <= self.capacity:
            return
        size = max(positions, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = torch.empty((old.shape[0], size, old.shape[2]), dtype=old.dtype)
                new[:, : self.length] = old[:, : self.length]
                buffers[i] = new

    def fill_from(self, cache) -> None:
        """Copy a transformers ``DynamicCache`` (after the prompt's forward) into the buffers."""
        length = cache.get_seq_length()
        self.reserve(length + 1)
        for i, layer in enumerate(cache.layers):
            self.keys[i][:, :length] = layer.keys[0]
            self.values[i][:, :length] = layer.values[0]
        self.length = length


class LeanDecoder:
    """Decode steps of one generation on a Mixtral-structured bf16 model on the CPU.

    Build with ``LeanDecoder.build``; ``start`` takes over the prompt's cache, ``step`` returns the
    next logits.
    """

    def __init__(self, model: nn.Module, layers: list[_Layer]) -> None:
        cfg = model.config
        inner = model.model
        self.model = model
        self.layers = layers
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm, self.norm_eps = inner.norm.weight, float(inner.norm.variance_epsilon)
        self.lm_head = model.lm_head
        self.heads, self.kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.scale = self.head_dim**-0.5
        self.cache = LeanCache(len(layers), self.kv_heads, self.head_dim, 0)
        self._scores = torch.empty(0, dtype=torch.float32)

    @classmethod
    def build(cls, model: nn.Module) -> LeanDecoder | None:
        """A lean decoder for ``model``, or None when it cannot take this path (the reason is logged).

        Args:
            model: a loaded model.

        Returns:
            The decoder, or None: not a Mixtral-structured bf16 CPU model in eval mode, a sliding
            window, a layer of another structure, ``MOE_LOCAL_LEAN=0``, or no native operations.
        """
        why = _unsupported(model)
        if why:
            log.debug("lean decode step not used: %s", why)
            return None
        layers = []
        for layer in model.model.layers:
            attn, moe = layer.self_attn, layer.mlp
            layers.append(
                _Layer(
                    norm1=layer.input_layernorm.weight,
                    eps1=float(layer.input_layernorm.variance_epsilon),
                    q=_projection(attn.q_proj),
                    k=_projection(attn.k_proj),
                    v=_projection(attn.v_proj),
                    o=_projection(attn.o_proj),
                    norm2=layer.post_attention_layernorm.weight,
                    eps2=float(layer.post_attention_layernorm.variance_epsilon),
                    router=ops.Router(moe.gate.weight, int(moe.gate.top_k), renormalize=True),
                    experts=moe.experts,
                )
            )
        return cls(model, layers)

    def start(self, cache) -> None:
        """Take over the keys and values of the prompt's forward (a ``DynamicCache``)."""
        self.cache.fill_from(cache)

    def step(self, token: int) -> torch.Tensor:
        """The next token's logits [V] (bf16) after ``token``, which joins the cache."""
        cache = self.cache
        pos = cache.length
        cache.reserve(pos + 1)
        if self._scores.numel() < pos + 1:
            self._scores = torch.empty(max(2 * (pos + 1), 256), dtype=torch.float32)
        x = self.embed(torch.tensor([token]))  # [1, H]
        cos, sin = self.rotary(x[None], torch.tensor([[pos]]))  # [1, 1, D] each, bf16
        cos, sin = cos[0, 0].contiguous(), sin[0, 0].contiguous()
        for i, layer in enumerate(self.layers):
            h = ops.rmsnorm(x[0], layer.norm1, layer.eps1)[None]  # [1, H]
            q = ops.rope_(layer.q(h).view(self.heads, self.head_dim), cos, sin)  # [Hq, D]
            k = ops.rope_(layer.k(h).view(self.kv_heads, self.head_dim), cos, sin)  # [Hkv, D]
            keys, values = cache.keys[i], cache.values[i]
            keys[:, pos] = k
            values[:, pos] = layer.v(h).view(self.kv_heads, self.head_dim)
            attn = ops.attend(q, keys, values, pos + 1, self.scale, self._scores)  # [Hq * D]
            x = x + layer.o(attn[None])
            h = ops.rmsnorm(x[0], layer.norm2, layer.eps2)[None]
            experts, weights = layer.router(h[0])
            x = x + layer.experts.decode_token(h, experts, weights)
        cache.length = pos + 1
        x = ops.rmsnorm(x[0], self.norm, self.norm_eps)[None]
        return self.lm_head(x)[0]


def _unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot take the lean path, or None when it can."""
    if env.LEAN.get().strip() == "0":
        return f"{env.LEAN.name}=0"
    from transformers.models.mixtral import modeling_mixtral as mx

    if type(model) is not mx.MixtralForCausalLM or type(getattr(model, "model", None)) is not mx.MixtralModel:
        return f"{type(model).__name__} is not Mixtral's structure"
    if model.training:
        return "the model is in training mode"
    if getattr(model, "dtype", None) is not torch.bfloat16 or model.device.type != "cpu":
        return "not a bf16 model on the CPU"
    cfg = model.config
    if getattr(cfg, "sliding_window", None) is not None:
        return "a sliding attention window"
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    if head_dim > ops.MAX_HEAD_DIM or head_dim % 2 or cfg.hidden_size > ops.MAX_ROUTER_WIDTH:
        return "head or hidden size beyond the native operations' buffers"
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        return "query heads not a multiple of key/value heads"
    inner = model.model
    norms = [inner.norm] + [
        n for layer in inner.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    for norm in norms:
        if (
            type(norm) is not mx.MixtralRMSNorm
            or norm.weight.dtype is not torch.bfloat16
            or norm.weight.device.type != "cpu"
        ):
            return "a norm not in bf16 on the CPU"
    for layer in inner.layers:
        if type(layer) is not mx.MixtralDecoderLayer or type(layer.self_attn) is not mx.MixtralAttention:
            return "a layer of another structure"
        gate = layer.mlp.gate
        if type(layer.mlp) is not mx.MixtralSparseMoeBlock or type(gate) is not mx.MixtralTopKRouter:
            return "a router of another structure"
        if gate.weight.dtype is not torch.bfloat16 or gate.weight.device.type != "cpu":
            return "a router not in bf16 on the CPU"
        if not isinstance(layer.mlp.experts, OffloadedExperts):
            return "experts not served by moe-local's store"
        if any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()):
            return "forward hooks on a layer"
    if not ops.available():
        return "the native operations are not available"
    return None
