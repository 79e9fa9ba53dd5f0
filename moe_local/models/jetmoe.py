"""JetMoE with its feed-forward experts on transformers' experts interface.

transformers' ``JetMoeMoE`` keeps a layer's experts as two ``JetMoeParallelExperts``:
``input_linear.weight`` [E, 2I, H] (gate rows, then up rows) and ``output_linear.weight``
[E, H, I], run over tokens sorted by expert with sizes its router counts. That is the fused
layout of the experts interface under other names, so ``JetMoeExpertsForCausalLM`` here is transformers'
own class with each ``mlp`` a ``JetMoeMoE`` whose experts are a ``JetMoeExperts`` (``gate_up_proj``,
``down_proj``) taking ``(hidden, top_k_index, top_k_weights)``; ``CONVERSION`` renames the released
keys onto it. The router is transformers' (top-k of float32 logits, softmax over those k), the
output bias is added after the experts as transformers adds it.

The attention's experts (``JetMoeMoA``, a mixture of query/output projections) are left as
transformers has them: they stay in memory.

Not a family of the ``moe_local.models`` registry (no ``MODEL_TYPE``): transformers defines the
config; ``moe_local.loading.meta`` builds this class for ``jetmoe``.
Legend: T=tokens, K=experts per token, E=experts, H=hidden size, I=expert intermediate size.
"""

from __future__ import annotations

import threading

import torch
from transformers.core_model_loading import WeightRenaming
from transformers.models.jetmoe import modeling_jetmoe as hf

from moe_local.models.glu_experts import GluExperts


class JetMoeExperts(GluExperts):
    """JetMoE's feed-forward experts: ``gate_up_proj`` [E, 2I, H] (gate first), ``down_proj`` [E, H, I]."""

    def __init__(self, config) -> None:
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        super().__init__(e, h, i, config.activation_function)


class JetMoeMoE(hf.JetMoeMoE):
    """transformers' JetMoE router and output bias around a ``JetMoeExperts``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        del self.input_linear, self.output_linear  # their weights are the experts' now
        self.experts = JetMoeExperts(config)

    def forward(self, layer_input: torch.Tensor) -> torch.Tensor:
        """[B, S, H] -> [B, S, H]."""
        bsz, length, width = layer_input.size()
        x = layer_input.reshape(-1, width)  # [T, H]
        logits = self.router.layer(x).float()  # [T, E]
        top_logits, top_index = logits.topk(self.router.top_k, dim=1)  # [T, K]
        weights = torch.softmax(top_logits, dim=1).type_as(x)  # [T, K]
        out = self.experts(x, top_index, weights)
        return out.view(bsz, length, width) + self.bias


class JetMoeExpertsForCausalLM(hf.JetMoeForCausalLM):
    """transformers' JetMoE causal LM with each feed-forward a ``JetMoeMoE`` (experts on the interface).

    Its own class name, so ``CONVERSION`` is registered for it alone: transformers' JetMoE class
    keeps loading the released keys as before.
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = JetMoeMoE(config)


MODEL_CLASSES = {"jetmoe": JetMoeExpertsForCausalLM}
CONVERSION = [
    WeightRenaming(r"mlp\.input_linear\.weight", "mlp.experts.gate_up_proj"),
    WeightRenaming(r"mlp\.output_linear\.weight", "mlp.experts.down_proj"),
]

_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register ``CONVERSION`` for ``JetMoeExpertsForCausalLM`` (by its class name), once."""
    global _registered
    with _lock:
        if _registered:
            return
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping

        register_checkpoint_conversion_mapping(
            JetMoeExpertsForCausalLM.__name__, list(CONVERSION), overwrite=True
        )
        _registered = True
