"""LongCat-Flash with its computing experts on transformers' experts interface.

transformers' ``LongcatFlashExperts`` routes each token to k of ``n_routed_experts + zero_expert_num``
experts: the first ``n_routed_experts`` (E) are gated MLPs (``gate_up_proj`` [E+Z, 2I, H], whose last
Z rows are never used, ``down_proj`` [E, H, I]); the others are zero-compute experts that return
their input. ``LongcatFlashForCausalLM`` here is transformers' own class with each ``mlp.experts`` a
``LongcatFlashExperts`` of the E computing experts only (``num_experts`` E, the ids the others get are
skipped, as moe-local's offloaded experts skip any id past ``num_experts``), and each ``mlp`` a
``LongcatFlashMoE`` that adds the zero-compute experts' weighted inputs after them, in the order
transformers adds them (by expert id, after every computing expert). Checkpoint keys load one to
one; the reader takes rows 0..E-1 of ``gate_up_proj``.

Not a family of the ``moe_local.models`` registry (no ``MODEL_TYPE``): transformers defines the
config; ``moe_local.loading.meta`` builds this class for ``longcat_flash``.
Legend: T=tokens, K=experts per token, E=computing experts, Z=zero-compute experts, H=hidden size,
I=expert intermediate size.
"""

from __future__ import annotations

import torch
from transformers.models.longcat_flash import modeling_longcat_flash as hf

from moe_local.models.glu_experts import GluExperts


class LongcatFlashExperts(GluExperts):
    """The E computing experts, fused: ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I] (the
    zero-compute experts' ids, E and above, are skipped here: ``LongcatFlashMoE`` adds them)."""

    def __init__(self, config) -> None:
        e, h, i = config.n_routed_experts, config.hidden_size, config.expert_ffn_hidden_size
        super().__init__(e, h, i, config.hidden_act)


class LongcatFlashMoE(hf.LongcatFlashMoE):
    """transformers' router; the computing experts, then the zero-compute ones (identity) added."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.experts = LongcatFlashExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, S, H] -> [B, S, H]."""
        shape = hidden_states.shape
        _, weights, index = self.router(hidden_states)  # [T, K] each
        x = hidden_states.view(-1, shape[-1])  # [T, H]
        out = self.experts(x, index, weights)
        for z in index[index >= self.experts.num_experts].unique().tolist():  # ascending, as transformers
            token, slot = torch.where(index == z)
            out.index_add_(0, token, (x[token] * weights[token, slot, None]).to(out.dtype))
        return out.view(*shape)


class LongcatFlashForCausalLM(hf.LongcatFlashForCausalLM):
    """transformers' LongCat-Flash causal LM with each ``mlp`` a ``LongcatFlashMoE``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = LongcatFlashMoE(config)


MODEL_CLASSES = {"longcat_flash": LongcatFlashForCausalLM}
