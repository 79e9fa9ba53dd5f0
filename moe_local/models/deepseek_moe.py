"""DeepSeek-MoE (``model_type: "deepseek"``; DeepSeek-MoE 16B: 64 fine-grained experts + 2 shared, top-6).

Reproduces the forward of the remote code published with the checkpoints
(``modeling_deepseek.py`` / ``configuration_deepseek.py`` of deepseek-ai/deepseek-moe-16b-base and
-chat; architecture in github.com/deepseek-ai/DeepSeek-MoE and arXiv:2401.06066), written anew on
transformers' building blocks:

- Llama attention, RMSNorm and RoPE (``rope_theta``, ``rope_scaling``) as transformers defines them;
- layer ``i`` is MoE when ``n_routed_experts`` is set, ``i >= first_k_dense_replace`` and
  ``i % moe_layer_freq == 0``; every other layer has a dense SwiGLU ``mlp`` of ``intermediate_size``;
- the router is a bare ``mlp.gate.weight`` [E, H]: softmax over the E logits (computed in float32
  here, as transformers' MoE routers do; identical to the reference in a float32 forward), top-k,
  and the k weights renormalised (sum + 1e-20) only when ``norm_topk_prob``;
- ``n_shared_experts`` ungated shared experts, one SwiGLU ``mlp.shared_experts`` of width
  ``moe_intermediate_size * n_shared_experts``, added to the routed output.

Checkpoint keys are the released ones (``model.layers.N.mlp.experts.E.gate_proj.weight``,
``mlp.gate.weight``, ``mlp.shared_experts.*``); ``CONVERSION`` fuses the per-expert tensors onto the
experts interface exactly as transformers does for Qwen2-MoE. Only ``scoring_func: "softmax"``
exists in the reference; anything else is refused when the config is read.
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
    SwigluMLP,
)

MODEL_TYPE = "deepseek"


@strict
class DeepseekMoeConfig(PreTrainedConfig):
    """The config of DeepSeek-MoE: the released ``configuration_deepseek.py`` fields and defaults."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pretraining_tp: int | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
    head_dim: int | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Refuse what the reference does not define (its gate raises on any other scoring function)."""
        if self.scoring_func != "softmax":
            raise ValueError(
                f"scoring_func {self.scoring_func!r} is not defined by DeepSeek-MoE (only 'softmax')"
            )
        if self.n_routed_experts is not None and not self.num_experts_per_tok:
            raise ValueError("n_routed_experts is set but num_experts_per_tok is not")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` has the MoE block (the reference's placement rule)."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )


class DeepseekMoeRouter(BareRouter):
    """``mlp.gate``: softmax over all experts, top-k, optional renormalisation."""

    def __init__(self, config: DeepseekMoeConfig) -> None:
        super().__init__(config.n_routed_experts, config.hidden_size)
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, H] -> expert ids [T, K] and their weights [T, K] (in the hidden dtype)."""
        scores = self(hidden_states).softmax(dim=-1, dtype=torch.float32)  # [T, E]
        weights, index = torch.topk(scores, self.top_k, dim=-1)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return index, weights.to(hidden_states.dtype)


class DeepseekMoeBlock(nn.Module):
    """Routed experts plus the always-on shared experts."""

    def __init__(self, config: DeepseekMoeConfig) -> None:
        super().__init__()
        self.gate = DeepseekMoeRouter(config)
        self.experts = SwigluExperts(config, config.n_routed_experts, config.moe_intermediate_size)
        if config.n_shared_experts is not None:
            self.shared_experts = SwigluMLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        index, weights = self.gate.route(x)
        y = self.experts(x, index, weights)
        if getattr(self, "shared_experts", None) is not None:
            y = y + self.shared_experts(x)
        return y.reshape(shape)


class DeepseekMoeModel(LlamaMoeModel):
    """The decoder stack of DeepSeek-MoE."""

    config_class = DeepseekMoeConfig

    def make_layer(self, config: DeepseekMoeConfig, layer_idx: int) -> nn.Module:
        if config.is_moe_layer(layer_idx):
            ffn: nn.Module = DeepseekMoeBlock(config)
        else:
            ffn = SwigluMLP(config, config.intermediate_size)
        return LlamaMoeDecoderLayer(config, layer_idx, ffn, "mlp")


class DeepseekMoeForCausalLM(LlamaMoeForCausalLM):
    """DeepSeek-MoE causal LM (checkpoint class name ``DeepseekForCausalLM``)."""

    config_class = DeepseekMoeConfig
    model_class = DeepseekMoeModel


CONFIG_CLASS = DeepseekMoeConfig
MODEL_CLASS = DeepseekMoeForCausalLM
ROUTER = "linear"
CONVERSION = [
    WeightConverter(
        source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
        target_patterns="mlp.experts.gate_up_proj",
        operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
    ),
    WeightConverter(
        source_patterns="mlp.experts.*.down_proj.weight",
        target_patterns="mlp.experts.down_proj",
        operations=[MergeModulelist(dim=0)],
    ),
]
