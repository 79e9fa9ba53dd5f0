"""The registry of moe_local.models: discovery, registration with transformers, prefetch hints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_local.config import LoadOptions, SamplingParams
from moe_local.generation import generate
from moe_local.loading.families import families_markdown, router_of
from moe_local.loading.loader import load
from moe_local.models import families, family_of, family_of_architectures, register_families, router_kind
from moe_local.synth import synth_config
from moe_local.tiny import make_tiny_checkpoint, tiny_config
from tests.models.released import PROMPT, TOKENS, hf_greedy

OWN = ("deepseek", "skywork_moe", "grok-1")


def test_discovers_every_family_module():
    found = families()
    for model_type in OWN:
        fam = found[model_type]
        assert fam.model_type == fam.module.MODEL_TYPE
        assert fam.config_class.model_type == fam.model_type
    assert "_llama_moe" not in {f.module.__name__.rsplit(".", 1)[-1] for f in found.values()}


def test_registration_is_idempotent_and_reaches_the_auto_classes():
    register_families()
    register_families()
    for model_type in OWN:
        fam = family_of(model_type)
        config = AutoConfig.for_model(model_type)
        assert type(config) is fam.config_class
    model = AutoModelForCausalLM.from_config(tiny_config("deepseek"))
    assert type(model) is family_of("deepseek").model_class


def test_a_port_without_model_type_is_found_by_its_architecture():
    assert family_of_architectures(["Grok1ModelForCausalLM"]).model_type == "grok-1"
    assert family_of_architectures(["MixtralForCausalLM"]) is None
    assert family_of_architectures("Grok1ModelForCausalLM") is None  # not a list: as absent


@pytest.mark.parametrize("model_type", OWN)
def test_prefetch_reads_the_linear_router(model_type):
    register_families()
    from moe_local.loading.meta import build_on_meta

    config = tiny_config(model_type)
    meta = build_on_meta(config, torch.float32)
    from moe_local.experts.sites import find_expert_sites

    site = find_expert_sites(meta)[0]
    block = meta.get_submodule(site.name.rpartition(".")[0])
    assert router_kind(block) == "linear"
    weight, _ = router_of(block, site.num_experts, config.hidden_size)
    assert weight is not None and tuple(weight.shape) == (site.num_experts, config.hidden_size)


def test_a_family_without_a_linear_router_gets_no_guess(monkeypatch):
    """``ROUTER = None`` (an attention router, say): router_of makes no next-layer guess."""
    fam = family_of("deepseek")
    register_families()
    from moe_local.loading.meta import build_on_meta

    meta = build_on_meta(tiny_config("deepseek"), torch.float32)
    block = meta.model.layers[1].mlp
    monkeypatch.setitem(families(), "deepseek", type(fam)(**{**vars(fam), "router": None}))
    assert router_of(block, 4, 32) == (None, None)


def test_synth_knows_the_released_shapes():
    assert synth_config("deepseek-moe-16b").n_routed_experts == 64
    assert synth_config("skywork-moe").experts_per_layer == 16
    grok = synth_config("grok-1")
    assert (grok.hidden_size, grok.num_experts, grok.num_attention_heads, grok.num_key_value_heads) == (
        6144,
        8,
        48,
        8,
    )
    phi = synth_config("phi-3.5-moe-16x2")
    assert (phi.num_local_experts, phi.num_experts_per_tok) == (16, 2)


def test_families_table_lists_the_own_families():
    table = families_markdown()
    for model_type in OWN:
        assert f"| {model_type} | `moe_local.models." in table


def test_mixtral_with_16_experts_top_2_is_exact(tmp_path):
    """The "16 experts, top-2" shape as a Mixtral config: moe-local's tokens equal transformers'."""
    folder = make_tiny_checkpoint("mixtral", tmp_path / "m16", num_local_experts=16, num_experts_per_tok=2)
    want = hf_greedy(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True)
    lm = load(folder, LoadOptions(dtype="float32"))
    assert lm.sites[0].num_experts == 16
    assert generate(lm, PROMPT, params).tokens == want
    one = max(lm.store.get(s.layer, 0).nbytes for s in lm.sites)
    budgeted = load(folder, LoadOptions(dtype="float32", expert_memory=one))
    assert generate(budgeted, PROMPT, params).tokens == want


@pytest.mark.parametrize("model_type", OWN)
def test_synth_writes_a_loadable_copy_of_an_own_family(tmp_path, model_type):
    from moe_local.inspection import inspect_model
    from moe_local.synth import synth

    cfg = tmp_path / "cfg"
    tiny_config(model_type).save_pretrained(cfg)
    out = synth(str(cfg / "config.json"), tmp_path / "out")
    info = inspect_model(out)
    assert info.family == model_type and info.quantized and info.moe_layers >= 1
    lm = load(out)
    assert len(generate(lm, [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True)).tokens) == 3
