"""DBRX with its experts on transformers' experts interface.

transformers' ``DbrxExperts`` already takes ``(hidden, top_k_index, top_k_weights)``, but keeps the
weights in ``mlp`` as three flat tensors of E experts' rows each: ``w1`` (gate) and ``v1`` (up)
[E*I, H], and ``w2`` [E*I, H], the down projection stored [in, out]. ``DbrxForCausalLM`` here is
transformers' own class with each ``ffn.experts`` a ``DbrxExperts`` on the interface (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I]); the checkpoint keeps its released keys, which
``moe_local.format.hf_experts`` reads expert by expert (``FLAT_GLU``: rows ``e*I`` to ``(e+1)*I`` of each).
The router and its weight normalisation stay transformers' ``DbrxFFN``.

DBRX numbers its layers ``transformer.blocks.N``: each experts module carries its block's index
as ``moe_layer``, which moe-local's site finder reads.

Not a family of the ``moe_local.models`` registry (no ``MODEL_TYPE``): transformers defines the
config; ``moe_local.loading.meta`` builds this class for ``dbrx``.
Legend: T=tokens, K=experts per token, E=experts, H=hidden size, I=expert intermediate size.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.dbrx import modeling_dbrx as hf


class DbrxExperts(nn.Module):
    """E gated experts, fused: ``gate_up_proj`` [E, 2I, H] (``w1``'s rows, ``v1``'s), ``down_proj`` [E, H, I].

    Args:
        ffn_config: DBRX's ``ffn_config`` (``moe_num_experts``, ``ffn_hidden_size``, ``hidden_size``).
        moe_layer: the index of the block this layer's experts belong to.
    """

    has_gate = True
    has_bias = False
    is_transposed = False
    is_concatenated = True

    def __init__(self, ffn_config, moe_layer: int) -> None:
        super().__init__()
        e, i, h = ffn_config.moe_num_experts, ffn_config.ffn_hidden_size, ffn_config.hidden_size
        self.num_experts = e
        self.moe_layer = moe_layer
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.act_fn = ACT2FN[ffn_config.ffn_act_fn.get("name", "silu")]

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[n, 2I] -> [n, I]: ``act(gate) * up``, as transformers computes it."""
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """[..., H] tokens, [T, K] expert ids and weights -> [..., H] weighted sum of the experts' outputs."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        out = torch.zeros_like(x)
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)
            h = self._apply_gate(nn.functional.linear(x[token], self.gate_up_proj[e]))  # [n, I]
            y = nn.functional.linear(h, self.down_proj[e])  # [n, H]
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out.reshape(shape)


class DbrxForCausalLM(hf.DbrxForCausalLM):
    """transformers' DBRX causal LM with each block's ``ffn.experts`` a ``DbrxExperts``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        for n, block in enumerate(self.transformer.blocks):
            block.ffn.experts = DbrxExperts(config.ffn_config, n)


MODEL_CLASSES = {"dbrx": DbrxForCausalLM}
