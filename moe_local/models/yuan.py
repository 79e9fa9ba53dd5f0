"""Yuan 2.0-M32 (``model_type: "yuan"``): Localized Filtering-based Attention and the attention router.

Reproduces the forward pass of IEIT Systems' Hugging Face release ``IEITYuan/Yuan2-M32-hf``, as
its modeling file (``yuan_hf_model.py``, published in github.com/IEIT-Yuan/Yuan2.0-M32 as
``3rd_party/AutoGPTQ/auto_gptq/modeling/yuan_moe_hf_model.py``) computes it at inference. Written
anew on transformers' building blocks (RMSNorm, rotate-half RoPE, the attention interface,
``DynamicCache``, the experts interface); nothing of that file is imported or run.

What it reproduces:

- config: the released keys, MoE settings nested in ``moe_config`` (``moe_num_experts``,
  ``moe_top_k``, ``ffn_hidden_size``, ``gated_linear_unit``, ``norm_topk_prob``);
  ``attention_projection_size`` sizes the heads (M32: 16 heads of 256 over hidden 2048).
- attention: v from x; q and k from ``RMSNorm(conv2(conv1(x)) + x)`` (``lf_gate``: two causal
  2-tap convolutions, H -> H/2 -> H, the norm's eps fixed at 1e-6 as in the reference), then
  q_proj/k_proj outputs concatenated and split per head, so head h takes its q and its k from
  consecutive slices of ``[q_proj(x), k_proj(x)]`` (the reference's interleaving). RoPE
  (rotate-half, base 10000) covers the first ``hidden_size // num_attention_heads`` dimensions
  of each head. Causal attention with fp32 softmax: the released config runs the reference's
  flash-attention path, which attends causally and ignores ``reset_attention_mask``; a padding
  mask, which that path ignores too, is honoured here.
- RoPE numerics: the reference keeps the inverse frequencies and the positions in bfloat16
  (positions above 256 round to a multiple of 2, above 512 of 4, ...) and takes cos/sin in
  bfloat16. That is reproduced exactly by default; ``rope_in_bf16: false`` computes in float32.
- cache: besides keys and values, ``YuanCache`` keeps each layer's last two attention inputs,
  so the convolutions continue exactly across prefill chunks and decode steps.
- router (``mlp.gate.{query,key,value}``, each [E, H]): per token q, k, v in [E]; in float32
  ``softmax_j(q_i k_j)`` weights v into E logits, then softmax, top-k and, with
  ``norm_topk_prob``, renormalisation; weights are cast to the activation dtype before mixing.
- experts: ``w1`` [2I, H] (first half through SiLU, times the second half) and ``w2`` [H, I],
  held as transformers' fused ``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I]; ``w1`` is
  already [gate; up] in that order. ``CONVERSION`` maps the released per-expert keys.
- not covered: the dense Yuan 2.0 releases (same ``model_type``, their own modeling code, RoPE in
  float32) and experts without a gated linear unit; both are refused in one line.

Legend: B=batch, S=new tokens, H=hidden size, E=experts, I=expert width, D=head size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.configuration_utils import PreTrainedConfig
from transformers.core_model_loading import MergeModulelist, WeightConverter, WeightRenaming
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm, eager_attention_forward, rotate_half

from moe_local.errors import UnsupportedModelError

MODEL_TYPE = "yuan"
LF_NORM_EPS = 1e-6  # the reference builds lf_gate's norm with its default eps, not rms_norm_eps
ROPE_BASE = 10000.0

# The released per-expert keys: ``w1`` (already [gate; up]) is renamed ``gate_up_proj`` so no
# reader takes it for Mixtral's gate-only ``w1``, then transformers stacks each into the fused
# experts (moe-local leaves the stacking out and reads experts one by one from the renamed keys).
CONVERSION = [
    WeightRenaming(r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_up_proj."),
    WeightConverter(
        source_patterns=".experts.*.gate_up_proj.weight",
        target_patterns=".experts.gate_up_proj",
        operations=[MergeModulelist(dim=0)],
    ),
    WeightConverter(
        source_patterns=".experts.*.w2.weight",
        target_patterns=".experts.down_proj",
        operations=[MergeModulelist(dim=0)],
    ),
]
# No next-layer guess for prefetch: the router is not a linear map of x (softmax(q k^T) v), so
# ``gate.query.weight`` [E, H] must not be read as a router weight.
ROUTER = None


@strict
class YuanConfig(PreTrainedConfig):
    """The released Yuan 2.0 config: top-level keys as config.json has them, MoE in ``moe_config``."""

    model_type = "yuan"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    vocab_size: int = 135040
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    attention_projection_size: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 77185
    bos_token_id: int | None = 77185
    eos_token_id: int | list[int] | None = 77185
    tie_word_embeddings: bool = True
    moe_config: dict | None = None
    use_flash_attention: bool = True
    rope_in_bf16: bool = True  # moe-local's switch; the reference's numerics by default

    def __post_init__(self, **kwargs):
        moe = dict(self.moe_config or {})
        moe.setdefault("moe_num_experts", 0)
        moe.setdefault("moe_top_k", 2)
        moe.setdefault("norm_topk_prob", True)
        moe.setdefault("gated_linear_unit", True)
        moe.setdefault("ffn_hidden_size", self.intermediate_size)
        self.moe_config = moe
        super().__post_init__(**kwargs)

    # The MoE settings under the names moe-local and transformers read (inspect, validation, caches):
    # properties over ``moe_config``, so a saved config.json keeps the released layout; settable, so
    # a config.json that also spells them, or code that shrinks a config, writes them through.
    @property
    def num_local_experts(self) -> int:
        return int(self.moe_config["moe_num_experts"])

    @num_local_experts.setter
    def num_local_experts(self, value: int) -> None:
        self.moe_config["moe_num_experts"] = int(value)

    @property
    def num_experts_per_tok(self) -> int:
        return int(self.moe_config["moe_top_k"])

    @num_experts_per_tok.setter
    def num_experts_per_tok(self, value: int) -> None:
        self.moe_config["moe_top_k"] = int(value)

    @property
    def moe_intermediate_size(self) -> int:
        return int(self.moe_config["ffn_hidden_size"])

    @moe_intermediate_size.setter
    def moe_intermediate_size(self, value: int) -> None:
        self.moe_config["ffn_hidden_size"] = int(value)

    @property
    def head_dim(self) -> int:
        return (self.attention_projection_size or self.hidden_size) // self.num_attention_heads

    @head_dim.setter
    def head_dim(self, value: int) -> None:
        self.attention_projection_size = int(value) * self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @num_key_value_heads.setter
    def num_key_value_heads(self, value: int) -> None:
        if value != self.num_attention_heads:
            raise ValueError(f"num_key_value_heads = {value}: Yuan has one key/value head per query head")


class YuanCache(DynamicCache):
    """Keys and values as ``DynamicCache``, plus each layer's last two attention inputs [B, 2, H]."""

    def __init__(self, config: PreTrainedConfig | None = None) -> None:
        super().__init__(config=config)
        self.lf_states: dict[int, torch.Tensor] = {}

    def lf_update(self, layer_idx: int, x: torch.Tensor) -> torch.Tensor | None:
        """Record ``x`` [B, S, H]; return the two inputs before it (None at the sequence start).

        A one-token start keeps a zero before it, the convolution's own padding.
        """
        before = self.lf_states.get(layer_idx)
        joined = x if before is None else torch.cat([before, x], dim=1)
        if joined.shape[1] < 2:
            joined = torch.cat([torch.zeros_like(joined), joined], dim=1)
        self.lf_states[layer_idx] = joined[:, -2:].detach()
        return before

    def reset(self) -> None:
        super().reset()
        self.lf_states.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for i, s in self.lf_states.items():
            self.lf_states[i] = s.index_select(0, beam_idx.to(s.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for i, s in self.lf_states.items():
            self.lf_states[i] = s.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for i, s in self.lf_states.items():
            self.lf_states[i] = s[indices]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # the inputs before the cut are gone: the convolution cannot resume
            raise UnsupportedModelError(
                "a Yuan cache cannot be cropped (its convolution state moves forward only)"
            )
        super().crop(tokens_to_remove)


def yuan_rope(
    position_ids: torch.Tensor, dim: int, dtype: torch.dtype, in_bf16: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, S, dim] for ``position_ids`` [B, S], as the reference's cached tables hold them."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, dim, 2).float().to(position_ids.device) / dim))
    work = torch.bfloat16 if in_bf16 else torch.float32
    inv_freq = inv_freq.to(work)
    table = torch.arange(int(position_ids.max()) + 1, device=position_ids.device, dtype=work)  # [P]
    freqs = torch.einsum("i,j->ij", table, inv_freq)  # [P, dim/2], rounded to ``work`` as the reference
    emb = torch.cat([freqs, freqs], dim=-1)  # [P, dim]
    return emb.cos()[position_ids].to(dtype), emb.sin()[position_ids].to(dtype)


class YuanLocalizedFiltering(nn.Module):
    """``RMSNorm(conv2(conv1(x)) + x)`` with causal 2-tap convolutions over the sequence."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        # Conv2d with a (2, 1) kernel as the checkpoint stores it ([out, in, 2, 1]), padded one step
        self.conv1 = nn.Conv2d(hidden_size, hidden_size // 2, (2, 1), padding=(1, 0))
        self.conv2 = nn.Conv2d(hidden_size // 2, hidden_size, (2, 1), padding=(1, 0))
        self.output_layernorm = LlamaRMSNorm(hidden_size, eps=LF_NORM_EPS)

    def forward(self, x: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
        """x [B, S, H]; ``before`` [B, 2, H] the two inputs preceding x, or None at the start."""
        s = x.shape[1]
        if before is None:
            inp = x.transpose(1, 2).unsqueeze(-1)  # [B, H, S, 1]
            mid = self.conv1(inp)[:, :, :s]  # the zero padding before position 0 is the causal pad
            out = self.conv2(mid)[:, :, :s]
        else:
            inp = torch.cat([before, x], dim=1).transpose(1, 2).unsqueeze(-1)  # [B, H, S+2, 1]
            mid = self.conv1(inp)[:, :, 1 : s + 2]  # conv1 at the last old input and the S new ones
            out = self.conv2(mid)[:, :, 1 : s + 1]
        out = out.squeeze(-1).transpose(1, 2)  # [B, S, H]
        return self.output_layernorm(out + x)


class YuanAttention(nn.Module):
    """Localized Filtering-based Attention (Yuan 2.0)."""

    def __init__(self, config: YuanConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.rotary_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        width = self.num_heads * self.head_dim
        self.v_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.lf_gate = YuanLocalizedFiltering(config.hidden_size)
        self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, s, _ = hidden_states.shape
        before = cache.lf_update(self.layer_idx, hidden_states) if isinstance(cache, YuanCache) else None
        value = self.v_proj(hidden_states).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        lf = self.lf_gate(hidden_states, before)
        qk = torch.cat([self.q_proj(lf), self.k_proj(lf)], dim=-1).view(
            b, s, self.num_heads, 2 * self.head_dim
        )
        query, key = (t.transpose(1, 2) for t in qk.chunk(2, dim=-1))  # [B, heads, S, D] each
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)  # [B, 1, S, rotary]
        r = self.rotary_dim
        query = torch.cat([query[..., :r] * cos + rotate_half(query[..., :r]) * sin, query[..., r:]], dim=-1)
        key = torch.cat([key[..., :r] * cos + rotate_half(key[..., :r]) * sin, key[..., r:]], dim=-1)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        return self.o_proj(out.reshape(b, s, -1).contiguous()), weights


class YuanAttentionRouter(nn.Module):
    """Attention router: E logits per token from softmax(q k^T) v over the experts, in float32."""

    def __init__(self, config: YuanConfig) -> None:
        super().__init__()
        experts = config.num_local_experts
        self.query = nn.Linear(config.hidden_size, experts, bias=False)
        self.key = nn.Linear(config.hidden_size, experts, bias=False)
        self.value = nn.Linear(config.hidden_size, experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> router logits [T, E] (float32)."""
        q, k, v = (proj(x).float().unsqueeze(-1) for proj in (self.query, self.key, self.value))  # [T, E, 1]
        weights = torch.softmax(q @ k.transpose(1, 2), dim=-1)  # [T, E, E]
        return (weights @ v).squeeze(-1)


@use_experts_implementation
class YuanExperts(nn.Module):
    """Every expert of a layer as fused 3-D weights: ``down(silu(gate) * up)`` with ``w1 = [gate; up]``."""

    def __init__(self, config: YuanConfig) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        width = int(config.moe_config["ffn_hidden_size"])
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * width, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, width))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [T, H], top_k_index/top_k_weights [T, K] -> [T, H]."""
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            token, slot = torch.where(top_k_index == e)
            gate, up = F.linear(hidden_states[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[e]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class YuanMoeBlock(nn.Module):
    """Attention router, then the top-k experts mixed by their routing weights."""

    def __init__(self, config: YuanConfig) -> None:
        super().__init__()
        if not config.moe_config["gated_linear_unit"]:
            raise UnsupportedModelError("Yuan experts without a gated linear unit are not supported")
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = bool(config.moe_config["norm_topk_prob"])
        self.gate = YuanAttentionRouter(config)
        self.experts = YuanExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        probs = torch.softmax(self.gate(x), dim=1, dtype=torch.float32)  # [T, E]
        weights, index = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(x, index, weights.to(x.dtype)).reshape(shape)


class YuanDecoderLayer(nn.Module):
    """Pre-norm attention and MLP, each with a residual."""

    def __init__(self, config: YuanConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = YuanAttention(config, layer_idx)
        if config.num_local_experts < 1:  # the dense Yuan 2.0 releases have their own, other code
            raise UnsupportedModelError(
                "Yuan 2.0 without experts (no moe_config.moe_num_experts) is not supported: "
                "moe-local reproduces Yuan2.0-M32"
            )
        self.mlp = YuanMoeBlock(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs
    ) -> torch.Tensor:
        attn, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class YuanPreTrainedModel(PreTrainedModel):
    """Shared settings of the Yuan models."""

    config_class = YuanConfig
    config: YuanConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["YuanDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, YuanExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)


class YuanModel(YuanPreTrainedModel):
    """Embeddings, decoder layers and the final norm."""

    def __init__(self, config: YuanConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([YuanDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run the decoder; with ``use_cache`` and no cache, a new ``YuanCache`` is returned."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = YuanCache(config=self.config)
        if cache is not None and not isinstance(cache, YuanCache) and cache.get_seq_length() > 0:
            raise UnsupportedModelError("Yuan needs its own YuanCache (it carries the convolution state)")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past)[None]
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        rope = yuan_rope(
            position_ids.expand(inputs_embeds.shape[0], -1),
            self.config.hidden_size // self.config.num_attention_heads,
            inputs_embeds.dtype,
            self.config.rope_in_bf16,
        )
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, rope, mask, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class YuanForCausalLM(YuanPreTrainedModel, GenerationMixin):
    """Yuan 2.0 with its language-model head (tied to the embeddings in the release)."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: YuanConfig) -> None:
        super().__init__(config)
        self.model = YuanModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generation starts from None; the model builds its YuanCache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [B, S or logits_to_keep, V], the cache, and the loss when ``labels`` are given."""
        legacy = kwargs.pop("past_key_values", None)  # the pre-5.24 name of ``cache``
        cache = legacy if cache is None else cache
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


CONFIG_CLASS = YuanConfig
MODEL_CLASS = YuanForCausalLM
