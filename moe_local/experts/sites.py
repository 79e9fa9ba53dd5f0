"""Where a model keeps its experts: one ``ExpertsSite`` per layer's experts module.

A site is found on the model itself (built on meta), never guessed from checkpoint names: any
module on transformers' experts interface (fused 3-D ``gate_up_proj``/``down_proj``) is one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from moe_local.errors import CheckpointError, UnsupportedModelError
from moe_local.experts.module import is_experts_module

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class ExpertsSite:
    """One layer's experts module: its name in the model and its layout facts."""

    name: str  # module path in memory, e.g. "model.layers.3.mlp.experts"
    layer: int
    num_experts: int
    has_gate: bool
    has_bias: bool
    is_transposed: bool  # fused weights stored [E, in, out] instead of [E, out, in]
    is_concatenated: bool  # gate and up rows concatenated (True) or interleaved (False)


def find_expert_sites(model: nn.Module) -> list[ExpertsSite]:
    """List every experts module of ``model`` in layer order.

    Raises:
        UnsupportedModelError: a module looks like experts but lacks transformers' experts interface.
    """
    sites = []
    for name, module in model.named_modules():
        if is_experts_module(module):
            m = _LAYER_RE.search(name + ".")
            own = getattr(module, "moe_layer", None)  # a model that numbers its MoE layers itself (Switch)
            if not isinstance(own, int) and m is None:
                raise UnsupportedModelError(f"cannot tell which layer the experts module {name} belongs to")
            if int(module.num_experts) < 1:  # e.g. num_local_experts 0 where the family has no dense MLP
                n = int(module.num_experts)
                raise CheckpointError(
                    f"the config gives {name} {n} experts; an experts module needs 1 or more"
                )
            sites.append(
                ExpertsSite(
                    name=name,
                    layer=own if isinstance(own, int) else int(m.group(1)),
                    num_experts=int(module.num_experts),
                    has_gate=bool(module.has_gate),
                    has_bias=bool(getattr(module, "has_bias", False)),
                    is_transposed=bool(getattr(module, "is_transposed", False)),
                    is_concatenated=bool(getattr(module, "is_concatenated", True)),
                )
            )
        elif name.endswith("experts") and any(p.dim() == 3 for p in module.parameters(recurse=False)):
            raise UnsupportedModelError(
                f"{type(module).__name__} keeps its experts in a layout moe-local does not support yet "
                "(no transformers experts interface)"
            )
    return sites
