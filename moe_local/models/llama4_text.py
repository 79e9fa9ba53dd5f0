"""Llama 4 (Scout, Maverick) text models with their experts on transformers' experts interface.

transformers' ``Llama4TextMoe`` runs every expert on every token: its router keeps each token's
top-k logits, turns them into sigmoid scores (0 for the other experts), scales the token's input
by each expert's score, and ``Llama4TextExperts`` multiplies all of them with one ``bmm`` over
``gate_up_proj`` [E, H, 2I] and ``down_proj`` [E, I, H] (stored transposed: [in, out]). An
expert given a zero input gives zero (no biases), so only the top-k experts add anything.

``Llama4ForCausalLM`` here is transformers' own class with each MoE feed-forward replaced by
``Llama4MoE``: the same router, shared expert and parameters (so checkpoint keys load one to one),
whose experts module ``Llama4Experts`` takes ``(hidden, top_k_index, top_k_weights)`` like every
experts module on the interface. The score scales the expert's input, not its output, so the
block hands the experts one row per (token, chosen expert), already scaled, with weight 1, and
sums each token's rows. moe-local's expert swap, offload and quantization then apply unchanged
(``is_transposed``: the reader turns each [in, out] slice into [out, in]).

Not a family of the ``moe_local.models`` registry (no ``MODEL_TYPE``): transformers defines the
config; ``moe_local.loading.meta`` builds this class for ``llama4_text`` and, from its text config,
for ``llama4`` (Scout and Maverick as published: ``language_model.model.layers...`` keys, whose
prefix the key mapping strips as transformers' loader does; the vision tower is not loaded).
Legend: T=tokens, K=experts per token, E=experts, H=hidden size, I=expert intermediate size.
"""

from __future__ import annotations

import torch
from transformers.models.llama4 import modeling_llama4 as hf


class Llama4Experts(hf.Llama4TextExperts):
    """transformers' fused Llama 4 experts, on the experts interface (rows routed by index)."""

    has_gate = True
    has_bias = False
    is_transposed = True  # gate_up_proj [E, H, 2I], down_proj [E, I, H]
    is_concatenated = True  # gate is the first I columns, up the last I (``chunk(2)``)

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[n, 2I] -> [n, I]: ``up * act(gate)``, as transformers computes it."""
        gate, up = gate_up.chunk(2, dim=-1)
        return up * self.act_fn(gate)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """[T, H] rows, [T, K] expert ids and weights -> [T, H] weighted sum of the experts' outputs."""
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)
            h = self._apply_gate(hidden_states[token] @ self.gate_up_proj[e])  # [n, I]
            y = h @ self.down_proj[e]  # [n, H]
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


class Llama4MoE(hf.Llama4TextMoe):
    """transformers' router and shared expert; the routed experts get only their tokens' rows."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.experts = Llama4Experts(config)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., H] -> ([T, H] output, [T, E] router logits), as ``Llama4TextMoe`` returns them."""
        x = hidden_states.reshape(-1, self.hidden_dim)  # [T, H]
        _, logits = self.router(x)  # [T, E] (the router's call, so its logits can be recorded)
        top_value, top_index = torch.topk(logits, self.top_k, dim=1)  # [T, K]: the router's choice
        scores = torch.sigmoid(top_value.float()).to(logits.dtype)  # [T, K]
        rows = (x[:, None, :] * scores[..., None]).reshape(-1, self.hidden_dim)  # [T*K, H]
        ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
        routed = self.experts(rows, top_index.reshape(-1, 1), ones)  # [T*K, H]
        out = self.shared_expert(x)
        out.add_(routed.reshape(x.shape[0], self.top_k, -1).sum(dim=1))
        return out, logits


class Llama4ForCausalLM(hf.Llama4ForCausalLM):
    """transformers' Llama 4 causal LM with each MoE feed-forward a ``Llama4MoE``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        for layer in self.model.layers:
            if isinstance(layer.feed_forward, hf.Llama4TextMoe):
                layer.feed_forward = Llama4MoE(config)


MODEL_CLASSES = {"llama4": Llama4ForCausalLM, "llama4_text": Llama4ForCausalLM}
