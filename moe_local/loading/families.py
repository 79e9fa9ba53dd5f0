"""Per-family facts: which families are proven, what sizes one expert, renames, routers.

Key renames between disk and memory come from transformers' own conversion mapping, so names
are never guessed from file names. Where the experts are is ``moe_local.experts.sites``; how
they are read is ``moe_local.format`` (one ``ExpertSource`` per checkpoint format).
Legend: E=experts, H=hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

# Families proven by tests; others whose experts follow transformers' experts interface load too.
TESTED_FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "phimoe",
)
# The config field that sizes one expert (its intermediate width I), per tested family.
EXPERT_WIDTH = {
    "mixtral": "intermediate_size",
    "qwen2_moe": "moe_intermediate_size",
    "qwen3_moe": "moe_intermediate_size",
    "olmoe": "intermediate_size",
    "deepseek_v2": "moe_intermediate_size",
    "deepseek_v3": "moe_intermediate_size",
    "gpt_oss": "intermediate_size",
    "phimoe": "intermediate_size",
}


def router_of(
    block: nn.Module, num_experts: int, hidden: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The router weight [E, H] (and bias [E]) of an MoE block, found by shape, as float32 copies.

    Every supported family routes with a linear map of the hidden state, so the logit of expert e
    is ``x @ weight[e] + bias[e]``; the family's own scoring (softmax, sigmoid, groups) is monotone in it.
    """
    params = dict(block.named_parameters())
    for name, p in params.items():
        if "experts" in name or "shared" in name:
            continue
        if p.dim() == 2 and tuple(p.shape) == (num_experts, hidden):
            bias = params.get(name.rsplit(".", 1)[0] + ".bias")
            return p.detach().float().clone(), None if bias is None else bias.detach().float().clone()
    return None, None


def checkpoint_renamer(model: nn.Module):
    """Return a function mapping a checkpoint key to the model's in-memory name (renames only)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    prefix = getattr(model, "base_model_prefix", "model")
    own = set(model.state_dict().keys()) if not renamings else None

    def rename(key: str) -> str:
        out = apply_renamings(key, renamings) if renamings else key
        if own is not None and out not in own and f"{prefix}.{out}" in own:
            out = f"{prefix}.{out}"
        return out

    return rename
