"""Skywork-MoE (``model_type: "skywork_moe"``; Skywork-MoE-Base: 146B, 16 experts, top-2, 22B active).

Reproduces the forward of the remote code published with Skywork/Skywork-MoE-Base
(``modeling_skywork_moe.py``, described in github.com/SkyworkAI/Skywork-MoE and the technical
report arXiv:2406.06563; its gating as in SkyworkAI's vLLM port), written anew on transformers'
building blocks. It is Mixtral's architecture and layout (Llama attention, RMSNorm, RoPE;
``block_sparse_moe.gate`` [E, H]; experts ``block_sparse_moe.experts.E.w1/w3/w2``, SwiGLU) with
Skywork's gating:

- gating logit normalisation (``moe_use_logits_norm``): each token's router logits are divided by
  ``std(logits, unbiased) / moe_gate_norm_std`` before the softmax;
- softmax over the E experts (float32), top-k (``num_experts_per_tok``, 2 by default), the k weights
  renormalised; with ``moe_use_mixtral_gating`` the softmax is taken over the k selected logits,
  which gives the same weights;
- ``num_experts`` is a list (one count per MoE stage; the release has one: ``[16]``);
- unless ``moe_feature_no_mul_topk`` (or ``moe_use_mixtral_gating``) is set, the experts' input is
  multiplied by top-k, as in the reference's MoE layer.

The release has an MoE block in every layer (``moe_expert_interval: 1``) and a one-layer router
(``moe_2layer_gate: false``); other values name layouts no released checkpoint has and are refused
when the config is read. ``CONVERSION`` fuses the per-expert tensors onto transformers' experts
interface exactly as transformers does for Mixtral (without Mixtral's rename: the module keeps the
checkpoint's name ``block_sparse_moe``).
Legend: T=tokens, K=experts per token, E=experts, H=hidden size, I=expert intermediate size.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.configuration_utils import PreTrainedConfig
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.modeling_rope_utils import RopeParameters

from moe_local.models._llama_moe import (
    BareRouter,
    LlamaMoeDecoderLayer,
    LlamaMoeForCausalLM,
    LlamaMoeModel,
    SwigluExperts,
)

MODEL_TYPE = "skywork_moe"


@strict
class SkyworkMoeConfig(PreTrainedConfig):
    """Skywork-MoE's configuration: the released config's fields (Llama's plus the ``moe_*`` ones)."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    vocab_size: int = 65536
    hidden_size: int = 4608
    intermediate_size: int = 12288
    num_hidden_layers: int = 52
    num_attention_heads: int = 36
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.01
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pretraining_tp: int | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    num_experts: int | list[int] = 16
    num_experts_per_tok: int = 2
    moe_expert_interval: int = 1
    moe_use_mixtral_gating: bool = False
    moe_2layer_gate: bool = False
    moe_use_logits_norm: bool = False
    moe_gate_norm_std: float = 1.0
    moe_feature_no_mul_topk: bool = False
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
    head_dim: int | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    @property
    def experts_per_layer(self) -> int:
        """The routed experts of every MoE layer (the first entry of a ``num_experts`` list)."""
        n = self.num_experts
        return int(n[0] if isinstance(n, list) else n)

    def validate_architecture(self):
        """Refuse the layouts no released checkpoint has (their tensor names are not published)."""
        n = self.num_experts
        if isinstance(n, list) and (not n or len(set(n)) != 1):
            raise ValueError(f"num_experts {n} must give one count for every layer")
        if self.moe_expert_interval != 1:
            raise ValueError("moe_expert_interval other than 1 has no released Skywork-MoE checkpoint")
        if self.moe_2layer_gate:
            raise ValueError("moe_2layer_gate true has no released Skywork-MoE checkpoint")
        if not self.moe_gate_norm_std > 0:
            raise ValueError("moe_gate_norm_std must be positive")


class SkyworkMoeRouter(BareRouter):
    """``block_sparse_moe.gate`` with Skywork's logit normalisation."""

    def __init__(self, config: SkyworkMoeConfig) -> None:
        super().__init__(config.experts_per_layer, config.hidden_size)
        self.top_k = config.num_experts_per_tok
        self.logits_norm = config.moe_use_logits_norm
        self.target_std = config.moe_gate_norm_std
        self.mixtral_gating = config.moe_use_mixtral_gating

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, H] -> expert ids [T, K] and weights [T, K] (in the hidden dtype)."""
        logits = self(hidden_states).float()  # [T, E]
        if self.logits_norm:
            logits = logits / (logits.std(dim=-1, keepdim=True) / self.target_std)
        if self.mixtral_gating:
            top, index = torch.topk(logits, self.top_k, dim=-1)
            weights = top.softmax(dim=-1)
        else:
            weights, index = torch.topk(logits.softmax(dim=-1), self.top_k, dim=-1)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return index, weights.to(hidden_states.dtype)


class SkyworkMoeBlock(nn.Module):
    """Router and experts of one layer (checkpoint name ``block_sparse_moe``)."""

    def __init__(self, config: SkyworkMoeConfig) -> None:
        super().__init__()
        self.gate = SkyworkMoeRouter(config)
        self.experts = SwigluExperts(config, config.experts_per_layer, config.intermediate_size)
        self.input_scale = (
            1
            if config.moe_feature_no_mul_topk or config.moe_use_mixtral_gating
            else config.num_experts_per_tok
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        index, weights = self.gate.route(x)
        if self.input_scale != 1:
            x = x * self.input_scale
        return self.experts(x, index, weights).reshape(shape)


class SkyworkMoeModel(LlamaMoeModel):
    """The decoder stack of Skywork-MoE."""

    config_class = SkyworkMoeConfig

    def make_layer(self, config: SkyworkMoeConfig, layer_idx: int) -> nn.Module:
        return LlamaMoeDecoderLayer(config, layer_idx, SkyworkMoeBlock(config), "block_sparse_moe")


class SkyworkMoeForCausalLM(LlamaMoeForCausalLM):
    """Skywork-MoE causal LM (checkpoint class name ``SkyworkForCausalLM``)."""

    config_class = SkyworkMoeConfig
    model_class = SkyworkMoeModel


CONFIG_CLASS = SkyworkMoeConfig
MODEL_CLASS = SkyworkMoeForCausalLM
ROUTER = "linear"  # dividing a token's logits by their positive std keeps their order
CONVERSION = [
    WeightConverter(
        source_patterns=[".experts.*.w1.weight", ".experts.*.w3.weight"],
        target_patterns=".experts.gate_up_proj",
        operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
    ),
    WeightConverter(
        source_patterns=[".experts.*.w2.weight"],
        target_patterns=".experts.down_proj",
        operations=[MergeModulelist(dim=0)],
    ),
]
