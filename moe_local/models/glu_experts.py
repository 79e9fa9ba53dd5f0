"""``GluExperts``: E gated experts on transformers' experts interface, for the adapters of families
whose own modules hold their experts elsewhere (dbrx, jetmoe, longcat_flash).

``gate_up_proj`` [E, 2I, H] (gate rows first), ``down_proj`` [E, H, I], transformers' default gate
``act(gate) * up`` (its own function, so moe-local's fused CPU path recognises a SiLU one). The
forward is the reference moe-local swaps for ``OffloadedExperts``: each routed expert on its
tokens, weighted and summed; ids outside ``[0, E)`` are left to the caller (longcat_flash's
zero-compute experts).
Legend: T=tokens, K=experts per token, H=hidden size, I=expert intermediate size, E=experts.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import _default_apply_gate


class GluExperts(nn.Module):
    """E gated experts, fused as transformers' experts interface holds them.

    Args:
        num_experts: E.
        hidden_size: H.
        intermediate_size: I.
        activation: the gate's activation, by transformers' name (``silu``, ``gelu`` ...).
    """

    has_gate = True
    has_bias = False
    is_transposed = False
    is_concatenated = True
    _apply_gate = _default_apply_gate  # [n, 2I] -> [n, I]: act(gate) * up, transformers' own

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__()
        e, h, i = num_experts, hidden_size, intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.act_fn = ACT2FN[activation]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """[..., H] tokens, [T, K] expert ids and weights -> [..., H] weighted sum of the experts' outputs."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        out = torch.zeros_like(x)
        for e in top_k_index.unique().tolist():
            if not 0 <= e < self.num_experts:
                continue  # not a computing expert of this module (e.g. longcat_flash's zero-compute ones)
            token, slot = torch.where(top_k_index == e)
            h = self._apply_gate(nn.functional.linear(x[token], self.gate_up_proj[e]))  # [n, I]
            y = nn.functional.linear(h, self.down_proj[e])  # [n, H]
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out.reshape(shape)
