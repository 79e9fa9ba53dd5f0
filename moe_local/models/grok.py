"""Grok-1 (xAI; 314B, 64 layers, 8 experts, top-2), ``model_type: "grok-1"``.

Reproduces the forward of xAI's JAX reference (github.com/xai-org/grok-1, ``model.py`` and the
configuration in ``run.py``), written anew on transformers' building blocks:

- token embeddings multiplied by ``embedding_multiplier_scale`` (sqrt(6144) in Grok-1); logits are
  the final RMSNorm's output times the tied embedding, times ``output_multiplier_scale``;
- four RMSNorms per layer (before and after attention, before and after the MoE block), each
  computed in float32, the learned ``scale`` applied in float32, then cast (the reference's order);
- attention with GQA (48 query / 8 key-value heads in Grok-1) and RoPE (base 10000, applied in
  float32); logits taken in float32, multiplied by ``attn_output_multiplier``, soft-capped to
  ``max_attn_value * tanh(x / max_attn_value)``, masked, softmax in float32;
- the router: float32 logits of the float32 input, softmax over all experts, top-k, the k
  probabilities used as they are (no renormalisation);
- experts ``linear_1(gelu_tanh(linear(x)) * linear_v(x))`` (JAX's default GELU is the tanh one).

On disk the family uses the layout of the community PyTorch port hpcai-tech/grok-1
(``model.layers.N.attn.{q,k,v,o}_proj``, ``moe_block.gate``, ``moe_block.experts.E.linear``/
``linear_v``/``linear_1``, ``pre_attn_norm``/``post_attn_norm``/``pre_moe_norm``/``post_moe_norm``
``.scale``, ``model.norm.scale``, ``model.embed_tokens``, ``lm_head``), which maps onto the
reference one to one (its config.json has no ``model_type``: ``ARCHITECTURES`` names it); that
port computes its experts' GELU exactly (erf) where the reference uses the tanh form: this module
follows the reference. ``CONVERSION`` renames the per-expert tensors to
gate/up/down and fuses them onto transformers' experts interface.
Legend: B=batch, T=tokens, S=key positions, K=experts per token, E=experts, H=hidden size.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.configuration_utils import PreTrainedConfig
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import RopeParameters
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, repeat_kv, rotate_half

MODEL_TYPE = "grok-1"


@strict
class Grok1Config(PreTrainedConfig):
    """Grok-1's configuration (the reference's ``run.py`` values as defaults; hpcai-tech's field names)."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    default_theta = 10000.0

    vocab_size: int = 131072
    hidden_size: int = 6144
    intermediate_size: int = 32768
    num_hidden_layers: int = 64
    num_attention_heads: int = 48
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    attn_output_multiplier: float = 0.08838834764831845
    max_attn_value: float = 30.0
    max_position_embeddings: int = 8192
    embedding_multiplier_scale: float = 78.38367176906169
    output_multiplier_scale: float = 0.5773502691896257
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    num_experts_per_tok: int = 2
    num_experts: int = 8
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    initializer_range: float = 0.02
    rope_parameters: RopeParameters | dict | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """The reference's constraints: GQA groups divide the heads, a positive soft cap."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if not self.max_attn_value > 0:
            raise ValueError("max_attn_value must be positive")


class Grok1RMSNorm(nn.Module):
    """RMSNorm with the reference's ``scale``: normalised and scaled in float32, then cast."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.scale.float() * h).to(x.dtype)


def _causal_mask(q_pos: torch.Tensor, kv_len: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B or 1, 1, T, S] True where a query may attend to a key: causal, and not padding."""
    k_pos = torch.arange(kv_len, device=q_pos.device)
    allowed = k_pos[None, None, None, :] <= q_pos[:, None, :, None]  # [B, 1, T, S]
    if attention_mask is not None and attention_mask.dim() == 2:
        allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
    return allowed


class Grok1Attention(nn.Module):
    """Grok-1's attention: RoPE, float32 logits scaled and soft-capped, GQA."""

    def __init__(self, config: Grok1Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.multiplier = config.attn_output_multiplier
        self.cap = config.max_attn_value
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        shape = (b, t, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # [B, heads, T, D]
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = (p.unsqueeze(1) for p in position_embeddings)  # float32 [B, 1, T, D]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        logits = torch.matmul(q, k.transpose(2, 3)).float() * self.multiplier  # [B, heads, T, S]
        logits = self.cap * torch.tanh(logits / self.cap)
        logits = logits.masked_fill(~_causal_mask(position_ids, k.shape[2], attention_mask), -1e30)
        weights = torch.softmax(logits, dim=-1).to(q.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out)


@use_experts_implementation
class Grok1Experts(nn.Module):
    """E experts, fused: ``gate_up_proj`` [E, 2I, H] (``linear`` rows, ``linear_v`` rows), ``down_proj``."""

    def __init__(self, config: Grok1Config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.gate_up_proj = nn.Parameter(
            torch.empty(config.num_experts, 2 * config.intermediate_size, config.hidden_size)
        )
        self.down_proj = nn.Parameter(
            torch.empty(config.num_experts, config.hidden_size, config.intermediate_size)
        )
        self.act_fn = ACT2FN["gelu_pytorch_tanh"]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """[T, H] tokens, [T, K] expert ids and weights -> [T, H]."""
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)
            gate, up = nn.functional.linear(hidden_states[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


class Grok1Router(nn.Module):
    """``moe_block.gate``: float32 softmax over every expert, top-k, no renormalisation."""

    def __init__(self, config: Grok1Config) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(nn.functional.linear(x.float(), self.weight.float()), dim=-1)  # [T, E]
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        return index, weights.to(x.dtype)


class Grok1MoeBlock(nn.Module):
    """Router and experts of one layer."""

    def __init__(self, config: Grok1Config) -> None:
        super().__init__()
        self.gate = Grok1Router(config)
        self.experts = Grok1Experts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        index, weights = self.gate(x)
        return self.experts(x, index, weights).reshape(shape)


class Grok1DecoderLayer(nn.Module):
    """h += post_attn_norm(attn(pre_attn_norm(h))); h += post_moe_norm(moe(pre_moe_norm(h)))."""

    def __init__(self, config: Grok1Config, layer_idx: int) -> None:
        super().__init__()
        self.attn = Grok1Attention(config, layer_idx)
        self.moe_block = Grok1MoeBlock(config)
        eps = config.rms_norm_eps
        self.pre_attn_norm = Grok1RMSNorm(config.hidden_size, eps)
        self.post_attn_norm = Grok1RMSNorm(config.hidden_size, eps)
        self.pre_moe_norm = Grok1RMSNorm(config.hidden_size, eps)
        self.post_moe_norm = Grok1RMSNorm(config.hidden_size, eps)

    def forward(
        self, h: torch.Tensor, position_embeddings, position_ids, attention_mask, cache
    ) -> torch.Tensor:
        a = self.attn(self.pre_attn_norm(h), position_embeddings, position_ids, attention_mask, cache)
        h = h + self.post_attn_norm(a)
        return h + self.post_moe_norm(self.moe_block(self.pre_moe_norm(h)))


class Grok1PreTrainedModel(PreTrainedModel):
    """Weight init shared by the Grok-1 model classes."""

    config_class = Grok1Config
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["Grok1DecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Grok1Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, Grok1Router):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Grok1RMSNorm):
            init.ones_(module.scale)


class Grok1Model(Grok1PreTrainedModel):
    """Scaled embeddings, the decoder layers and the final RMSNorm."""

    def __init__(self, config: Grok1Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Grok1DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Grok1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
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
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.config.embedding_multiplier_scale
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (
                torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past
            ).unsqueeze(0)
        h = inputs_embeds
        # a float32 probe makes the rotary module return float32 cos/sin: RoPE is applied in float32
        position_embeddings = self.rotary_emb(h.float(), position_ids)
        for layer in self.layers:
            h = layer(h, position_embeddings, position_ids, attention_mask, cache)
        return MoeModelOutputWithPast(last_hidden_state=self.norm(h), cache=cache if use_cache else None)


class Grok1ForCausalLM(Grok1PreTrainedModel, GenerationMixin):
    """Grok-1's causal LM: tied output embedding, logits times ``output_multiplier_scale``."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Grok1Config) -> None:
        super().__init__(config)
        self.model = Grok1Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

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
    ) -> MoeCausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        h = slice_logits_to_keep(out.last_hidden_state, logits_to_keep)
        logits = self.lm_head(h) * self.config.output_multiplier_scale
        loss = None if labels is None else self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return MoeCausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


CONFIG_CLASS = Grok1Config
MODEL_CLASS = Grok1ForCausalLM
ROUTER = "linear"
# hpcai-tech/grok-1's config.json has no model_type, only this architecture (and its auto_map)
ARCHITECTURES = ("Grok1ModelForCausalLM",)
# per-expert names of the port -> gate/up/down (the names moe-local's expert readers know), then
# fused as transformers fuses Mixtral's; "linear" etc. occur nowhere else in the layout
CONVERSION = [
    WeightRenaming("linear.weight", "gate_proj.weight"),
    WeightRenaming("linear_v.weight", "up_proj.weight"),
    WeightRenaming("linear_1.weight", "down_proj.weight"),
    WeightConverter(
        source_patterns=[".experts.*.gate_proj.weight", ".experts.*.up_proj.weight"],
        target_patterns=".experts.gate_up_proj",
        operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
    ),
    WeightConverter(
        source_patterns=".experts.*.down_proj.weight",
        target_patterns=".experts.down_proj",
        operations=[MergeModulelist(dim=0)],
    ),
]
