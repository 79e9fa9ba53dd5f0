"""Families whose transformers experts are off the experts interface, adapted onto it (moe_local.models).

Each adapted family's greedy tokens equal transformers' own class on the same tiny checkpoint, in
memory and with a one-expert budget, its experts swapped for offloaded ones (so ``--expert-memory``
applies); the quantized copy generates. llama4_text and dbrx run in tests/loading/test_all_families.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moe_local.config import LoadOptions, SamplingParams
from moe_local.convert.writer import quantize_checkpoint
from moe_local.errors import CheckpointError, UnsupportedModelError
from moe_local.experts.module import OffloadedExperts
from moe_local.generation import generate
from moe_local.loading import families
from moe_local.loading.loader import load
from moe_local.recipes import load_recipe
from moe_local.tiny import make_tiny_checkpoint

PROMPT = [5, 6, 7, 8, 9]
TOKENS = 16
ADAPTED = ("inkling2_text", "inkling_text", "jetmoe", "longcat_flash")


def _greedy(model, n: int = TOKENS) -> list[int]:
    out = model.generate(
        torch.tensor([PROMPT]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None
    )
    return out[0, len(PROMPT) :].tolist()


def _exact_in_memory_and_budgeted(folder, want: list[int]) -> None:
    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True)
    lm = load(folder, LoadOptions(dtype="float32"))
    assert lm.sites
    assert all(isinstance(lm.model.get_submodule(s.name), OffloadedExperts) for s in lm.sites)
    assert generate(lm, PROMPT, params).tokens == want
    one = max(lm.store.get(s.layer, 0).nbytes for s in lm.sites)
    budgeted = load(folder, LoadOptions(dtype="float32", expert_memory=one))
    assert generate(budgeted, PROMPT, params).tokens == want
    assert budgeted.store.stats().total.misses > 0


@pytest.mark.parametrize("model_type", ADAPTED)
def test_adapted_family_is_exact_offloaded_and_quantized(model_type, tmp_path):
    folder = make_tiny_checkpoint(model_type, tmp_path / model_type)
    want = _greedy(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
    _exact_in_memory_and_budgeted(folder, want)
    quantize_checkpoint(folder, tmp_path / "q", load_recipe("experts-4bit"))
    lm = load(tmp_path / "q", LoadOptions(dtype="float32"))
    assert lm.sites
    assert len(generate(lm, PROMPT, SamplingParams(max_tokens=4, ignore_eos=True)).tokens) == 4


def test_llama4_as_published_runs_its_text_model(tmp_path):
    """Scout/Maverick's layout: a Llama4ForConditionalGeneration folder (``language_model.*`` keys)."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from moe_local.tiny import make_tokenizer, tiny_config

    vision = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        vision_output_dim=32,
        image_size=28,
        patch_size=14,
        projector_input_dim=32,
        projector_output_dim=32,
    )
    text = tiny_config("llama4_text").to_dict()
    config = Llama4Config(
        text_config=text,
        vision_config=vision,
        boi_token_index=300,
        eoi_token_index=301,
        image_token_index=302,
    )
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    folder = tmp_path / "scout"
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    # transformers' own causal LM of the folder (its text model) is the reference
    want = _greedy(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
    _exact_in_memory_and_budgeted(folder, want)


def test_dbrx_lacking_a_flat_expert_tensor_is_one_line(tmp_path):
    folder = make_tiny_checkpoint("dbrx", tmp_path / "dbrx")
    tensors = load_file(folder / "model.safetensors")
    del tensors["transformer.blocks.1.ffn.experts.mlp.v1"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        load(folder, LoadOptions(dtype="float32"))
    assert str(info.value) == "transformer.blocks.1.ffn.experts: checkpoint lacks mlp.v1"


def test_experts_quantized_in_an_unread_format_are_refused(tmp_path):
    """Inkling 2 Loop's release keeps NVFP4/MXFP8 experts (``w13_weight_scale``): refused, not misread."""
    folder = make_tiny_checkpoint("inkling2_text", tmp_path / "ink")
    tensors = load_file(folder / "model.safetensors")
    key = "model.llm.layers.0.mlp.experts.w13_weight"
    tensors[f"{key}_scale"] = torch.ones(tensors[key].shape[:2])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError) as info:
        load(folder, LoadOptions(dtype="float32"))
    assert str(info.value).startswith(f"{key}_scale: these experts are stored quantized")
    assert "\n" not in str(info.value)


def test_a_refused_family_says_why_in_one_line(tmp_path, monkeypatch):
    folder = make_tiny_checkpoint("olmoe", tmp_path / "olmoe")
    monkeypatch.setitem(families.UNSUPPORTED, "olmoe", "its experts need something moe-local lacks")
    with pytest.raises(UnsupportedModelError) as info:
        load(folder, LoadOptions(dtype="float32"))
    assert str(info.value) == "family 'olmoe' is not supported: its experts need something moe-local lacks"
    assert families.family_state("olmoe") == "refused: its experts need something moe-local lacks"
