"""The lean decode step: one token through a Mixtral- or Qwen-MoE-shaped model, no transformers dispatch.

transformers' forward for one token spends about as much time in module calls, mask and cache
bookkeeping and 5-15 small torch ops per norm, rotary embedding, attention and router as in the
matrix-vector products themselves (8 of 19 ms a token on the 8-layer benchmark model). This step
computes the same layer with one native call per small operation (``moe_local.lean.ops``), the
projections on the weights' own kernels, and the experts through the same ``OffloadedExperts``
(cache, prefetch, statistics and trace unchanged). The prompt still runs through transformers'
forward; its keys and values are then copied once into a preallocated cache (``LeanCache``).

The structures it knows (``structures()``): Mixtral; Qwen3-MoE (per-head q/k norms, ``norm_topk_prob``,
dense MLP layers where ``mlp_only_layers`` says); Qwen2-MoE (projection biases, and the shared
expert behind its sigmoid gate, both through their own modules); OLMoE (q/k norms over the whole
projections, ``clip_qkv``). Anything else, or a model whose
layers differ from the structure in any class, keeps transformers' forward (``LeanDecoder.build``
says why, in the debug log); ``MOE_LOCAL_LEAN=0`` turns the path off.

The values equal transformers' bf16 forward up to the order of float32 sums in attention, router and
norms, and router ties broken by the lower expert id (``tests/lean/test_decoder.py``).

Legend: H hidden size, D head size, Hq query heads, Hkv key/value heads, V vocabulary.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moe_local import env
from moe_local.experts.module import OffloadedExperts
from moe_local.lean import ops
from moe_local.lean.cache import LeanCache
from moe_local.quant import native

log = logging.getLogger(__name__)

Projection = Callable[[torch.Tensor], torch.Tensor]  # [B, I] bf16 -> [B, O] bf16


@dataclass(frozen=True)
class Structure:
    """The classes of one family's decoder, as transformers defines them, and what differs from Mixtral."""

    causal_lm: type
    model: type
    layer: type
    attention: type
    norm: type
    sparse_block: type
    router: type
    dense_mlp: type | None = None  # layers the config keeps dense (Qwen's mlp_only_layers)
    head_norms: bool = False  # RMSNorm of each query and key head before the rotation (Qwen3)
    projection_norms: bool = False  # RMSNorm of the whole query and key projections (OLMoE)
    shared_expert: bool = False  # a shared expert behind a sigmoid gate, added to the routed ones (Qwen2)
    window_in_config: bool = False  # the sliding window is read from the config (Mixtral), not the layer


@functools.cache
def structures() -> tuple[Structure, ...]:
    """The families the lean step computes (their transformers classes, imported on first use)."""
    from transformers.models.mixtral import modeling_mixtral as mx
    from transformers.models.olmoe import modeling_olmoe as ol
    from transformers.models.qwen2_moe import modeling_qwen2_moe as q2
    from transformers.models.qwen3_moe import modeling_qwen3_moe as q3

    return (
        Structure(
            mx.MixtralForCausalLM, mx.MixtralModel, mx.MixtralDecoderLayer, mx.MixtralAttention,
            mx.MixtralRMSNorm, mx.MixtralSparseMoeBlock, mx.MixtralTopKRouter, window_in_config=True,
        ),
        Structure(
            q3.Qwen3MoeForCausalLM, q3.Qwen3MoeModel, q3.Qwen3MoeDecoderLayer, q3.Qwen3MoeAttention,
            q3.Qwen3MoeRMSNorm, q3.Qwen3MoeSparseMoeBlock, q3.Qwen3MoeTopKRouter, q3.Qwen3MoeMLP,
            head_norms=True,
        ),
        Structure(
            q2.Qwen2MoeForCausalLM, q2.Qwen2MoeModel, q2.Qwen2MoeDecoderLayer, q2.Qwen2MoeAttention,
            q2.Qwen2MoeRMSNorm, q2.Qwen2MoeSparseMoeBlock, q2.Qwen2MoeTopKRouter, q2.Qwen2MoeMLP,
            shared_expert=True,
        ),
        Structure(
            ol.OlmoeForCausalLM, ol.OlmoeModel, ol.OlmoeDecoderLayer, ol.OlmoeAttention,
            ol.OlmoeRMSNorm, ol.OlmoeSparseMoeBlock, ol.OlmoeTopKRouter,
            projection_norms=True, window_in_config=True,
        ),
    )  # fmt: skip


def _projection(module: nn.Module) -> Projection:
    """The cheapest call computing ``module(x)`` for one bf16 row: the weight's kernel when it has one."""
    from moe_local.quant.dense import NativeDenseLinear
    from moe_local.quant.linear import QuantLinear

    if isinstance(module, QuantLinear) and module.bias is None:
        fast = getattr(module.quantized(), "native_weight", lambda: None)()
        if fast is not None:
            return fast.linear_bf16
    if (
        type(module) in (nn.Linear, NativeDenseLinear)
        and module.bias is None
        and module.weight.dtype is torch.bfloat16
    ):
        weight = module.weight
        if native.available():
            return lambda x: native.dense_bf16(x, weight)
    return module  # biases, other weight types: the module itself


def _norm(module: nn.Module) -> tuple[torch.Tensor, float]:
    return module.weight, float(module.variance_epsilon)


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's pieces, resolved once per generation."""

    norm1: tuple[torch.Tensor, float]  # ([H] bf16 weight, eps)
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    q_norm: tuple[torch.Tensor, float] | None
    k_norm: tuple[torch.Tensor, float] | None
    norms_per_head: bool  # q_norm/k_norm over each head (Qwen3), else over the whole projection (OLMoE)
    clip: float | None  # OLMoE's clip_qkv: q, k and v clamped to [-clip, clip] after the norms
    norm2: tuple[torch.Tensor, float]
    router: ops.Router | None  # None: a dense MLP layer
    experts: OffloadedExperts | None
    mlp: nn.Module  # the whole MLP block (a dense layer's MLP, or the sparse block for its shared expert)
    shared: bool

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP block on the normed hidden states ``h`` [B, H] (one row per sequence): [B, H]."""
        if self.router is None:
            return self.mlp(h)
        routes = [self.router(row) for row in h]
        out = self.experts.decode_rows(h, [r[0] for r in routes], [r[1] for r in routes])
        if self.shared:  # Qwen2-MoE: out + sigmoid(gate(h)) * shared_expert(h), as its block adds them
            block = self.mlp
            out = out + torch.sigmoid(block.shared_expert_gate(h)) * block.shared_expert(h)
        return out


def _layer(layer: nn.Module, s: Structure) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    sparse = type(mlp) is s.sparse_block
    gate = mlp.gate if sparse else None
    return _Layer(
        norm1=_norm(layer.input_layernorm),
        q=_projection(attn.q_proj),
        k=_projection(attn.k_proj),
        v=_projection(attn.v_proj),
        o=_projection(attn.o_proj),
        q_norm=_norm(attn.q_norm) if s.head_norms or s.projection_norms else None,
        k_norm=_norm(attn.k_norm) if s.head_norms or s.projection_norms else None,
        norms_per_head=s.head_norms,
        clip=None if getattr(attn.config, "clip_qkv", None) is None else float(attn.config.clip_qkv),
        norm2=_norm(layer.post_attention_layernorm),
        router=ops.Router(gate.weight, int(gate.top_k), bool(getattr(gate, "norm_topk_prob", True)))
        if sparse
        else None,
        experts=mlp.experts if sparse else None,
        mlp=mlp,
        shared=sparse and s.shared_expert,
    )


class LeanDecoder:
    """Decode steps of one generation on a bf16 CPU model of a known structure.

    Build with ``LeanDecoder.build``; ``start`` takes over the prompt's cache, ``step`` returns the
    next logits. ``step_rows`` decodes several sequences together, each with its own ``LeanCache``
    (``new_cache``): one pass over each weight serves them all, and each row's values are those of
    its sequence decoded alone.
    """

    def __init__(self, model: nn.Module, layers: list[_Layer], context: int | None = None) -> None:
        cfg = model.config
        inner = model.model
        self.layers = layers
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = _norm(inner.norm)
        self.lm_head = model.lm_head
        self.heads, self.kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        self.head_dim = _head_dim(cfg)
        self.scale = float(inner.layers[0].self_attn.scaling)  # head_dim ** -0.5 in these families
        self.context = context
        self.cache = self.new_cache()
        self._scores = torch.empty(0, dtype=torch.float32)

    @classmethod
    def build(cls, model: nn.Module, context: int | None = None) -> LeanDecoder | None:
        """A lean decoder for ``model``, or None when it cannot take this path (the reason is logged).

        Args:
            model: a loaded model.
            context: positions the generation may reach (its cache grows by doubling up to this).

        Returns:
            The decoder, or None: not a bf16 CPU model of a known structure in eval mode, a sliding
            window, a layer of another structure, ``MOE_LOCAL_LEAN=0``, or no native operations.
        """
        structure, why = _structure_of(model)
        if structure is None:
            log.debug("lean decode step not used: %s", why)
            return None
        return cls(model, [_layer(layer, structure) for layer in model.model.layers], context)

    @staticmethod
    def computes(model: nn.Module) -> bool:
        """Whether ``build`` would give ``model`` a lean decoder (the checks only, nothing built)."""
        return _structure_of(model)[0] is not None

    def new_cache(self) -> LeanCache:
        """An empty cache for one more sequence of this model (``step_rows``)."""
        return LeanCache(len(self.layers), self.kv_heads, self.head_dim, 0, limit=self.context)

    def start(self, cache) -> None:
        """Take over the keys and values of the prompt's forward (a ``DynamicCache``)."""
        self.cache.fill_from(cache)

    def step(self, token: int) -> torch.Tensor:
        """The next token's logits [V] (bf16) after ``token``, which joins the cache."""
        return self.step_rows([token], [self.cache])[0]

    def step_rows(self, tokens: list[int], caches: list[LeanCache]) -> torch.Tensor:
        """Each sequence's next logits [B, V] (bf16) after its token, which joins its cache.

        Args:
            tokens: the newest token of each of B sequences.
            caches: their caches, in the same order (each grows by one position).
        """
        hq, hkv, d = self.heads, self.kv_heads, self.head_dim
        positions = [cache.length for cache in caches]
        for cache, pos in zip(caches, positions, strict=True):
            cache.reserve(pos + 1)
        need = ops.scores_size(hq, hkv, max(positions) + 1)
        if self._scores.numel() < need:  # the attention's float32 scratch, shared by the rows in turn
            self._scores = torch.empty(2 * need, dtype=torch.float32)
        rows = len(tokens)
        x = self.embed(torch.tensor(tokens))  # [B, H]
        cos, sin = self.rotary(x[None], torch.tensor([positions]))  # [1, B, D] each, bf16
        tables = [(cos[0, b].contiguous(), sin[0, b].contiguous()) for b in range(rows)]
        for i, layer in enumerate(self.layers):
            h = ops.rmsnorm(x, *layer.norm1)  # [B, H]
            q, k, v = layer.q(h), layer.k(h), layer.v(h)  # [B, Hq * D], [B, Hkv * D], [B, Hkv * D]
            if layer.q_norm is not None and not layer.norms_per_head:
                q, k = ops.rmsnorm(q, *layer.q_norm), ops.rmsnorm(k, *layer.k_norm)
            if layer.clip is not None:
                q, k, v = (t.clamp(-layer.clip, layer.clip) for t in (q, k, v))
            q, k = q.reshape(rows * hq, d), k.reshape(rows * hkv, d)  # [B * Hq, D], [B * Hkv, D]
            if layer.q_norm is not None and layer.norms_per_head:
                q, k = ops.rmsnorm(q, *layer.q_norm), ops.rmsnorm(k, *layer.k_norm)
            q, k, v = q.view(rows, hq, d), k.view(rows, hkv, d), v.reshape(rows, hkv, d)
            attended = []
            for b, (cache, pos, (c, s)) in enumerate(zip(caches, positions, tables, strict=True)):
                qb = ops.rope_(q[b], c, s)  # in place: q[b] is a contiguous [Hq, D] block of q
                keys, values = cache.keys[i], cache.values[i]
                keys[:, pos] = ops.rope_(k[b], c, s)
                values[:, pos] = v[b]
                attended.append(ops.attend(qb, keys, values, pos + 1, self.scale, self._scores))  # [Hq * D]
            attn = attended[0][None] if rows == 1 else torch.stack(attended)  # [B, Hq * D]
            x = x + layer.o(attn)
            x = x + layer.feed_forward(ops.rmsnorm(x, *layer.norm2))
        for cache, pos in zip(caches, positions, strict=True):
            cache.length = pos + 1
        return self.lm_head(ops.rmsnorm(x, *self.norm))


def _head_dim(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _structure_of(model: nn.Module) -> tuple[Structure | None, str]:
    """The structure ``model`` has exactly, or None and why not."""
    if env.LEAN.get().strip() == "0":
        return None, f"{env.LEAN.name}=0"
    s = next((s for s in structures() if type(model) is s.causal_lm), None)
    if s is None or type(getattr(model, "model", None)) is not s.model:
        return None, f"{type(model).__name__} is not a structure it knows"
    if model.training:
        return None, "the model is in training mode"
    if getattr(model, "dtype", None) is not torch.bfloat16 or model.device.type != "cpu":
        return None, "not a bf16 model on the CPU"
    cfg = model.config
    head_dim = _head_dim(cfg)
    if head_dim > ops.MAX_HEAD_DIM or head_dim % 2 or cfg.hidden_size > ops.MAX_ROUTER_WIDTH:
        return None, "head or hidden size beyond the native operations' buffers"
    if not cfg.num_key_value_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
        return None, "query heads not a multiple of key/value heads"
    inner = model.model
    if type(inner.norm) is not s.norm:
        return None, "a final norm of another class"
    for layer in inner.layers:
        why = _layer_problem(layer, s, cfg)
        if why:
            return None, why
    if not ops.available():
        return None, "the native operations are not available"
    return s, ""


def _layer_problem(layer: nn.Module, s: Structure, cfg) -> str | None:
    attn, mlp = layer.self_attn, layer.mlp
    if type(layer) is not s.layer or type(attn) is not s.attention:
        return "a layer of another structure"
    # a window also changes what transformers' cache keeps: such a model keeps transformers' forward
    window = (
        getattr(cfg, "sliding_window", None) if s.window_in_config else getattr(attn, "sliding_window", None)
    )
    if window is not None:
        return "a sliding attention window"
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    norms += [attn.q_norm, attn.k_norm] if s.head_norms or s.projection_norms else []
    for norm in norms:
        if type(norm) is not s.norm or norm.weight.dtype is not torch.bfloat16:
            return "a norm of another class or dtype"
    if type(mlp) is s.sparse_block:
        gate = mlp.gate
        if type(gate) is not s.router or gate.weight.dtype is not torch.bfloat16:
            return "a router of another class or dtype"
        if not 1 <= int(gate.top_k) <= gate.weight.shape[0]:
            return "a router choosing more experts than it has"
        if not isinstance(mlp.experts, OffloadedExperts):
            return "experts not served by moe-local's store"
    elif s.dense_mlp is None or type(mlp) is not s.dense_mlp:
        return "an MLP of another structure"
    if any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()):
        return "forward hooks on a layer"
    return None
