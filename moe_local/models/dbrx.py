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

from transformers.models.dbrx import modeling_dbrx as hf

from moe_local.models.glu_experts import GluExperts


class DbrxExperts(GluExperts):
    """E gated experts, fused: ``gate_up_proj`` [E, 2I, H] (``w1``'s rows, ``v1``'s), ``down_proj`` [E, H, I].

    Args:
        ffn_config: DBRX's ``ffn_config`` (``moe_num_experts``, ``ffn_hidden_size``, ``hidden_size``).
        moe_layer: the index of the block this layer's experts belong to.
    """

    def __init__(self, ffn_config, moe_layer: int) -> None:
        e, i, h = ffn_config.moe_num_experts, ffn_config.ffn_hidden_size, ffn_config.hidden_size
        super().__init__(e, h, i, ffn_config.ffn_act_fn.get("name", "silu"))
        self.moe_layer = moe_layer


class DbrxForCausalLM(hf.DbrxForCausalLM):
    """transformers' DBRX causal LM with each block's ``ffn.experts`` a ``DbrxExperts``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        for n, block in enumerate(self.transformer.blocks):
            block.ffn.experts = DbrxExperts(config.ffn_config, n)


MODEL_CLASSES = {"dbrx": DbrxForCausalLM}
