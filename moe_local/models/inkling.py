"""Inkling, Inkling 2 and Inkling 2 Loop text models with their experts on transformers' experts interface.

transformers' experts modules of these families (``InklingExperts``, ``Inkling2Experts``,
``Inkling2LoopExperts``) already hold fused ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]
and take ``(hidden, top_k_index, top_k_weights)``; they only lack the interface's layout facts. The
classes here are transformers' own causal LMs with each experts module replaced by a subclass
that states them:

- Inkling: gate rows then up rows (``chunk``). Its shared experts are a 3-D stack too
  (``mlp.shared_experts``, always run): kept in memory, under the name ``mlp.shared_mlp`` so they are
  not taken for routed experts (``CONVERSION``: the checkpoint's keys renamed onto it).
- Inkling 2 (and Loop): the published ``w13_weight`` interleaves gate and up rows, which
  transformers de-interleaves on load (``Interleave``). Here the rows stay as published
  (``is_concatenated`` False: the reader takes them as stored) and the gate function takes every
  other column, the same values transformers' ``chunk`` takes after its de-interleave.
  transformers sums the k experts' outputs in float32; moe-local's offloaded experts sum in the
  compute dtype (identical in float32). Experts published quantized (NVFP4 / MXFP8 ``w13_weight_scale``
  tensors, Inkling 2 Loop's release) are refused by the reader: moe-local does not read them yet.

Not families of the ``moe_local.models`` registry (no ``MODEL_TYPE``): transformers defines the
configs; ``moe_local.loading.meta`` builds these classes.
Legend: E=experts, H=hidden size, I=expert intermediate size.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from transformers.core_model_loading import WeightConverter, WeightRenaming
from transformers.models.inkling import modeling_inkling as ink
from transformers.models.inkling2 import modeling_inkling2 as ink2
from transformers.models.inkling2_loop import modeling_inkling2_loop as loop


class _Interface:
    """The experts interface's layout facts, for a transformers experts module already fused."""

    has_gate = True
    has_bias = False
    is_transposed = False
    is_concatenated = True


class InklingExperts(_Interface, ink.InklingExperts):
    """transformers' Inkling experts (gate rows, then up rows)."""

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[n, 2I] -> [n, I]: ``act(gate) * up``, as transformers computes it."""
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up


class _Interleaved(_Interface):
    """Gate and up rows interleaved as published: every other column of the projection is the gate."""

    is_concatenated = False

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[n, 2I] interleaved -> [n, I]: the softcapped SwiGLU of transformers' de-interleaved halves."""
        return self.act_fn(gate_up[..., 0::2], gate_up[..., 1::2])


class Inkling2Experts(_Interleaved, ink2.Inkling2Experts):
    """transformers' Inkling 2 experts, ``gate_up_proj`` rows as published (interleaved)."""


class Inkling2LoopExperts(_Interleaved, loop.Inkling2LoopExperts):
    """transformers' Inkling 2 Loop experts, ``gate_up_proj`` rows as published (interleaved)."""


class InklingMoE(ink.InklingMoE):
    """transformers' Inkling MoE block, its shared experts under ``shared_mlp``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.experts = InklingExperts(config)
        self.shared_mlp = self.shared_experts
        del self.shared_experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, S, H] -> [B, S, H], as transformers' block computes it."""
        shape = hidden_states.shape
        _, weights, index, shared_gammas = self.gate(hidden_states)
        routed = self.experts(hidden_states.view(-1, shape[-1]), index, weights).view(*shape)
        return routed + self.shared_mlp(hidden_states, gammas=shared_gammas)


def _replace(model: nn.Module, old: type, make) -> None:
    for name, module in list(model.named_modules()):
        if type(module) is old:
            model.set_submodule(name, make())


class InklingExpertsForCausalLM(ink.InklingForCausalLM):
    """transformers' Inkling causal LM with each MoE block an ``InklingMoE``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        _replace(self, ink.InklingMoE, lambda: InklingMoE(config))


class Inkling2ExpertsTextModel(ink2.Inkling2TextModel):
    """transformers' Inkling 2 text model under a name of its own (its conversion is its parent's)."""


class Inkling2LoopExpertsTextModel(loop.Inkling2LoopTextModel):
    """transformers' Inkling 2 Loop text model under a name of its own (its conversion is its parent's)."""


class Inkling2ExpertsForCausalLM(ink2.Inkling2ForCausalLM):
    """transformers' Inkling 2 causal LM with each experts module an ``Inkling2Experts``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.model = Inkling2ExpertsTextModel(config)
        _replace(self, ink2.Inkling2Experts, lambda: Inkling2Experts(config))


class Inkling2LoopExpertsForCausalLM(loop.Inkling2LoopForCausalLM):
    """transformers' Inkling 2 Loop causal LM with each experts module an ``Inkling2LoopExperts``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.model = Inkling2LoopExpertsTextModel(config)
        _replace(self, loop.Inkling2LoopExperts, lambda: Inkling2LoopExperts(config))


MODEL_CLASSES = {
    "inkling_text": InklingExpertsForCausalLM,
    "inkling2_text": Inkling2ExpertsForCausalLM,
    "inkling2_loop_text": Inkling2LoopExpertsForCausalLM,
}
_GATE_UP = WeightRenaming(r"mlp\.experts\.w13_weight(?!_)", "mlp.experts.gate_up_proj")
_DOWN = WeightRenaming(r"mlp\.experts\.w2_weight(?!_)", "mlp.experts.down_proj")


def _experts_as_published(model_type: str) -> list:
    """transformers' conversion of ``model_type`` with the expert converters made plain renamings.

    Its converters that interleave or dequantize experts are replaced by renamings of the published
    tensors (the reader takes their rows as stored), and those of the experts' scales dropped.
    """
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    out = [_GATE_UP, _DOWN]
    for t in get_checkpoint_conversion_mapping(model_type) or []:
        experts = any("experts" in p for p in t.target_patterns)
        if experts and (isinstance(t, WeightConverter) or "w2_weight" in str(t.source_patterns)):
            continue
        out.append(t)
    return out


_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register each class's checkpoint conversion under its own class name, once."""
    global _registered
    with _lock:
        if _registered:
            return
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping

        register_checkpoint_conversion_mapping(
            InklingExpertsForCausalLM.__name__,
            [WeightRenaming(r"mlp\.shared_experts\.", "mlp.shared_mlp.")],
            overwrite=True,
        )
        for model_type, cls in MODEL_CLASSES.items():
            if model_type != "inkling_text":
                mapping = _experts_as_published(model_type)
                register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)
        # the text models' own lookup finds this empty mapping, not transformers' one for their model
        # type: their parent's conversion already covers their keys
        for inner in (Inkling2ExpertsTextModel, Inkling2LoopExpertsTextModel):
            register_checkpoint_conversion_mapping(inner.__name__, [], overwrite=True)
        _registered = True
