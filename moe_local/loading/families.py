"""Per-family facts: which families are proven or adapted, what sizes one expert, renames, routers.

Key renames between disk and memory come from transformers' own conversion mapping, so names
are never guessed from file names. Where the experts are is ``moe_local.experts.sites``; how
they are read is ``moe_local.format`` (one ``ExpertSource`` per checkpoint format).
Legend: E=experts, H=hidden size.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

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
    # defined in moe-local itself (moe_local.models): transformers has no class for them
    "deepseek",
    "skywork_moe",
    "grok-1",
    "yuan",
    # encoder-decoder: transformers' class, experts adapted (moe_local.models.switch)
    "switch_transformers",
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
    "deepseek": "moe_intermediate_size",
    "skywork_moe": "intermediate_size",
    "grok-1": "intermediate_size",
    "yuan": "moe_intermediate_size",
    "switch_transformers": "d_ff",
}
# Encoder-decoder MoE families moe-local runs (transformers defines them without a causal-LM
# class): model type -> the module adapting its experts.
ENCODER_DECODER = {"switch_transformers": "moe_local.models.switch"}
# Families whose transformers class keeps its experts off the experts interface: model type -> the
# module whose class (``MODEL_CLASSES``) is transformers' own with the experts moved onto it, so
# they are offloaded and quantized like any other (``moe_local.loading.meta.adapted_class``).
ADAPTED_EXPERTS = {
    "llama4": "moe_local.models.llama4_text",  # Scout/Maverick as published: their text model
    "llama4_text": "moe_local.models.llama4_text",
    "jetmoe": "moe_local.models.jetmoe",
    "dbrx": "moe_local.models.dbrx",
    "longcat_flash": "moe_local.models.longcat_flash",
    "inkling_text": "moe_local.models.inkling",
    "inkling2_text": "moe_local.models.inkling",
    "inkling2_loop_text": "moe_local.models.inkling",
}


def router_of(
    block: nn.Module, num_experts: int, hidden: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The router weight [E, H] (and bias [E]) of an MoE block, found by shape, as float32 copies.

    Every supported family routes with a linear map of the hidden state, so the logit of expert e
    is ``x @ weight[e] + bias[e]``; the family's own scoring (softmax, sigmoid, groups) is monotone in it.
    A family of ``moe_local.models`` that routes otherwise says so (``ROUTER = None``): no guess.
    """
    from moe_local.models import router_kind

    if router_kind(block) is None:
        return None, None
    params = dict(block.named_parameters())
    for name, p in params.items():
        if "experts" in name or "shared" in name:
            continue
        if p.dim() == 2 and tuple(p.shape) == (num_experts, hidden):
            bias = params.get(name.rsplit(".", 1)[0] + ".bias")
            return p.detach().float().clone(), None if bias is None else bias.detach().float().clone()
    return None, None


@dataclass
class DenseConversion:
    """Checkpoint tensors transformers merges or splits into non-expert weights on load.

    Attributes:
        converter: the family's ``WeightConverter`` (a private copy: it collects tensors).
        sources: ``(source pattern, checkpoint key)`` of every tensor it takes, in checkpoint order.
    """

    converter: object
    sources: list[tuple[str, str]] = field(default_factory=list)

    def convert(self, name: str, read, model: nn.Module) -> dict[str, torch.Tensor]:
        """Read the sources with ``read(key)`` and apply the converter: in-memory name -> tensor."""
        conv = copy.deepcopy(self.converter)
        for pattern, key in self.sources:
            conv.add_tensor(name, key, pattern, functools.partial(read, key))
        return conv.convert(name, model=model, config=model.config)


@dataclass
class KeyMap:
    """How a checkpoint's keys become the model's weights, by transformers' own conversion mapping.

    Attributes:
        renamed: in-memory name -> checkpoint key, for every key loaded one to one (experts
            included: their per-expert keys keep their names for the expert readers).
        converted: first in-memory target name -> the conversion that makes it (dense only).
    """

    renamed: dict[str, str]
    converted: dict[str, DenseConversion]


def _is_expert_transform(transform) -> bool:
    return any("experts" in p for p in transform.target_patterns)


def _key_mapper(model: nn.Module):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter) and not _is_expert_transform(t)]
    by_pattern: dict[str, object] = {}
    for conv in converters:
        for pattern in conv.source_patterns:
            by_pattern.setdefault(pattern, conv)
    prefix = getattr(model, "base_model_prefix", "model")
    meta = model.state_dict()

    def map_key(key: str) -> tuple[str, object | None, str | None]:
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if pattern is None and name not in meta and key in meta:
            # a rule too broad for this key (DeepSeek V4's ``.norm.`` -> ``.kv_norm.`` also hits
            # the final ``model.norm``): the key already names a weight of the model, keep it
            return key, None, None
        return name, (None if pattern is None else by_pattern[pattern]), pattern

    return map_key


def map_checkpoint_keys(model: nn.Module, keys) -> KeyMap:
    """Map checkpoint ``keys`` to ``model``'s names exactly as transformers' loader does.

    Every renaming applies, then at most one converter (``rename_source_key``, with the
    base-model prefix added or stripped as the model needs); converters that fuse experts are left
    out, since ``HfExperts`` reads experts one by one from their own keys.
    """
    map_key = _key_mapper(model)
    renamed: dict[str, str] = {}
    converted: dict[str, DenseConversion] = {}
    for key in keys:
        name, conv, pattern = map_key(key)
        if conv is None:
            renamed[name] = key
        else:
            converted.setdefault(name, DenseConversion(conv)).sources.append((pattern, key))
    return KeyMap(renamed, converted)


def checkpoint_renamer(model: nn.Module):
    """Return a function mapping a checkpoint key to the model's in-memory name (one-to-one keys)."""
    map_key = _key_mapper(model)
    return lambda key: map_key(key)[0]


# Config fields that count the routed experts of a layer, across families.
EXPERT_COUNT_KEYS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
)


def _declares_experts(values: dict) -> bool:
    for key in EXPERT_COUNT_KEYS:  # None or 1 by default still means the family has an MoE block
        v = values.get(key, False)
        if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return True
    ffn = values.get("ffn_config")  # DBRX nests its MoE fields
    return isinstance(ffn, dict) and _declares_experts(ffn)


def moe_model_types() -> list[str]:
    """Every model type of the installed transformers with a causal-LM class and routed experts.

    A type is MoE when its default config counts experts (``EXPERT_COUNT_KEYS``, or DBRX's
    ``ffn_config``), directly or in its ``text_config`` (multimodal wrappers).
    """
    import warnings

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.utils import logging as hf_logging

    found = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # default configs warn about their own token ids
    try:
        for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
            if model_type not in CONFIG_MAPPING:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    values = CONFIG_MAPPING[model_type]().to_dict()
            except Exception:  # a config without usable defaults (it needs sub-configs): not listed
                continue
            text = values.get("text_config")
            if _declares_experts(values) or (isinstance(text, dict) and _declares_experts(text)):
                found.append(model_type)
    finally:
        hf_logging.set_verbosity(verbosity)
    return found


# Families refused at open, with the reason (one line each): the one place that lists them. None at
# present: every MoE type of transformers 5.24 runs (docs/FAMILIES.md).
UNSUPPORTED: dict[str, str] = {}
# Families whose greedy tokens were measured identical to transformers' (in memory and with a
# one-expert budget) on tiny random checkpoints, beyond TESTED_FAMILIES (``MOE_LOCAL_ALL_FAMILIES=1
# pytest tests/loading/test_all_families.py``; transformers 5.24).
VERIFIED_FAMILIES = (
    "afmoe",
    "aria_text",
    "axk1",
    "axk2",
    "bailing_hybrid",
    "beam",
    "cohere2_moe",
    "dbrx",
    "deepseek_v32",
    "deepseek_v4",
    "doge",
    "dots1",
    "dots3_note",
    "dots3_note_text",
    "ernie4_5_moe",
    "exaone_moe",
    "flex_olmo",
    "flint",
    "gemma4",
    "gemma4_text",
    "glm4_moe",
    "glm4_moe_lite",
    "glm_moe_dsa",
    "granitemoe",
    "granitemoe_swa",
    "granitemoehybrid",
    "granitemoeshared",
    "hunyuan_v1_moe",
    "hy_v3",
    "hy_v4",
    "inkling2_loop_text",
    "inkling2_text",
    "inkling_text",
    "jamba",
    "jetmoe",
    "kimi_linear",
    "kolibri1",
    "laguna",
    "lara_mini",
    "lfm2_moe",
    "llama4",
    "llama4_text",
    "longcat_flash",
    "mellum",
    "mimo_v2_flash",
    "minimax",
    "minimax_m2",
    "minimax_m3_vl_text",
    "nemotron_h",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "qwen3_next",
    "qwen4_exp",
    "qwen4_exp_text",
    "sarvam_mla",
    "sarvam_moe",
    "solar_open",
    "zaya",
)
# Families whose experts are not on transformers' experts interface and have no adapter: loaded as
# ordinary weights, so an expert budget does not apply to them (a warning says so at load).
IN_MEMORY_EXPERTS = ("doge",)
# What the state of a family adds to "exact" (docs/FAMILIES.md, the load warning).
FAMILY_NOTES = {
    "doge": "experts stay in memory: each is two H-vectors looked up as embedding rows (no expert budget)",
    "jetmoe": "the attention's experts (mixture of attention heads) stay in memory",
    "llama4": "the text model (the vision tower is not loaded)",
    "inkling2_text": "experts published quantized (MXFP8 `w13_weight_scale`) are refused for now",
    "inkling2_loop_text": "experts published quantized (NVFP4 / MXFP8: its release) are refused for now",
}


def refusal(model_type: str) -> str | None:
    """The one-line reason moe-local refuses ``model_type``, or None."""
    reason = UNSUPPORTED.get(model_type)
    return None if reason is None else f"family {model_type!r} is not supported: {reason}"


def family_state(model_type: str) -> str:
    """``exact``, ``refused: <reason>`` or ``not verified yet`` for an MoE model type."""
    if model_type in UNSUPPORTED:
        return f"refused: {UNSUPPORTED[model_type]}"
    if model_type in TESTED_FAMILIES or model_type in VERIFIED_FAMILIES:
        notes = [FAMILY_NOTES.get(model_type)]
        return "; ".join(["exact", *(n for n in notes if n)])
    return "not verified yet"


def families_markdown() -> str:
    """The table of every MoE model type of the installed transformers with its state (docs/FAMILIES.md)."""
    import transformers

    lines = [
        "# MoE families",
        "",
        f"Every MoE model type of transformers {transformers.__version__} (`moe_model_types`), generated by",
        "`python -m moe_local.loading.families --markdown` from `moe_local/loading/families.py`.",
        "`exact`: greedy tokens identical to transformers' own model, in memory and with a one-expert",
        "budget, and the `experts-4bit` copy generates (`tests/loading/test_all_families.py`).",
        "",
        "| model type | state |",
        "|---|---|",
    ]
    lines += [f"| {t} | {family_state(t)} |" for t in moe_model_types()]
    lines += [
        "",
        "## Families whose experts moe-local adapts",
        "",
        "transformers' own class, its experts module replaced by one on the experts interface (same",
        "computation, checkpoint keys as published), so they are offloaded and quantized like any other",
        "(`ADAPTED_EXPERTS`, built by `moe_local.loading.meta`).",
        "",
        "| model type | module | state |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | `{module}` | {family_state(t)} |" for t, module in sorted(ADAPTED_EXPERTS.items())]
    lines += [
        "",
        "## Families moe-local defines itself",
        "",
        "Published as remote code or in another framework, with no transformers class: written in",
        "`moe_local/models/` (one module each, registered with transformers' auto classes), proven",
        "against an independent oracle in `tests/models/`. A folder's own `auto_map` code never runs.",
        "",
        "| model type | module | state |",
        "|---|---|---|",
    ]
    lines += [
        f"| {t} | `{fam.module.__name__}` | {family_state(t)} |" for t, fam in sorted(own_families().items())
    ]
    lines += [
        "",
        "## Encoder-decoder families",
        "",
        "transformers' own class with its experts moved onto the experts interface; the prompt is the",
        "encoder's input and the decoder's output is the completion (`moe_local.seq2seq`), proven",
        "against transformers' class in `tests/models/`. Served one generation at a time.",
        "",
        "| model type | module | state |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | `{module}` | {family_state(t)} |" for t, module in sorted(ENCODER_DECODER.items())]
    return "\n".join(lines) + "\n"


def own_families() -> dict:
    """The families defined in ``moe_local.models``, by model type (registered with transformers)."""
    from moe_local.models import families, register_families

    register_families()
    return families()


if __name__ == "__main__":
    import sys

    if "--markdown" in sys.argv[1:]:
        print(families_markdown(), end="")
    else:
        for t in moe_model_types():
            print(t, family_state(t), sep="\t")
