"""moe_local.tiny: how a family's default config is made tiny, and the size guard."""

from __future__ import annotations

import pytest

from moe_local.errors import MoeLocalError
from moe_local.tiny import MAX_PARAMETERS, make_tiny_checkpoint, shrunk_config_fields


def test_fields_tied_in_the_defaults_stay_tied():
    """Multi-head latent attention: one key/value head per query head, head_dim the rotary part."""
    defaults = dict(num_attention_heads=128, num_key_value_heads=128, head_dim=64, qk_rope_head_dim=64)
    out = shrunk_config_fields(defaults)
    assert out["num_key_value_heads"] == out["num_attention_heads"] == 4
    assert out["head_dim"] == out["qk_rope_head_dim"] == 4
    grouped = shrunk_config_fields(dict(num_attention_heads=32, num_key_value_heads=8, head_dim=128))
    assert (grouped["num_attention_heads"], grouped["num_key_value_heads"], grouped["head_dim"]) == (4, 2, 8)


def test_per_layer_lists_keep_each_kind_and_index_lists_are_renumbered():
    kinds = ["full", "full", "sliding", "sliding", "full", "linear"]
    out = shrunk_config_fields(dict(num_hidden_layers=6, layer_types=kinds, moe_layers=list(range(6))))
    assert out["num_hidden_layers"] == 4  # layers 0, 1, the first sliding (2) and the first linear (5)
    assert out["layer_types"] == ["full", "full", "sliding", "linear"]
    assert out["moe_layers"] == [0, 1, 2, 3]


def test_a_per_layer_config_keeps_the_kept_layers_entries_shrunk():
    kinds = ["a", "a", "b", "b", "b"]
    per_layer = {"02": {"num_attention_heads": 64, "kv_lora_rank": 1024}, "03": {"num_attention_heads": 64}}
    out = shrunk_config_fields(dict(num_hidden_layers=5, layer_types=kinds, per_layer_config=per_layer))
    assert out["layer_types"] == ["a", "a", "b"]
    assert out["per_layer_config"] == {"2": {"num_attention_heads": 4, "kv_lora_rank": 16}}


def test_a_multimodal_wrappers_text_config_is_shrunk():
    out = shrunk_config_fields(dict(text_config=dict(hidden_size=4096, vocab_size=202048, num_experts=None)))
    assert out["text_config"]["hidden_size"] == 32
    assert out["text_config"]["vocab_size"] == 320
    assert out["text_config"]["num_experts"] == 4  # None by default: an MoE block, sized


def test_a_model_too_large_for_a_tiny_one_is_refused_before_it_is_built(tmp_path):
    with pytest.raises(MoeLocalError) as info:
        make_tiny_checkpoint("mixtral", tmp_path / "big", hidden_size=2048, intermediate_size=8192)
    assert "parameters (more than" in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "big").exists()
    assert MAX_PARAMETERS < 2 * 2048 * 8192 * 3 * 4  # two layers of 4 such experts
