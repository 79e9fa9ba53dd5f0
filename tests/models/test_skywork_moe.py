"""Skywork-MoE (``model_type: "skywork_moe"``): exact against transformers' Mixtral with its router patched.

Skywork-MoE is Mixtral's architecture and tensor layout with gating logit normalisation; the oracle
is transformers' own ``MixtralForCausalLM`` loaded from the same tensors, each router patched here
to divide a token's logits by ``std(logits) / moe_gate_norm_std`` before Mixtral's softmax, top-k
and renormalisation. The tiny checkpoint has the released layout (Skywork/Skywork-MoE-Base).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

from moe_local.errors import CheckpointError
from moe_local.inspection import inspect_model
from moe_local.loading.checkpoint import load_config
from moe_local.loading.validate import check_raw
from tests.models.released import (
    check_exact_everywhere,
    headers_only_checkpoint,
    hf_greedy,
    random_tensors,
    write_released,
)

# config.json of Skywork/Skywork-MoE-Base as released (the model's real dimensions).
RELEASED = {
    "architectures": ["SkyworkForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_skywork_moe.SkyworkMoeConfig",
        "AutoModelForCausalLM": "modeling_skywork_moe.SkyworkForCausalLM",
    },
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4608,
    "initializer_range": 0.01,
    "intermediate_size": 12288,
    "max_position_embeddings": 8192,
    "model_type": "skywork_moe",
    "moe_2layer_gate": False,
    "moe_expert_interval": 1,
    "moe_feature_no_mul_topk": True,
    "moe_gate_norm_std": 1.0,
    "moe_use_logits_norm": True,
    "moe_use_mixtral_gating": False,
    "num_attention_heads": 36,
    "num_experts": [16],
    "num_hidden_layers": 52,
    "num_key_value_heads": 36,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "vocab_size": 65536,
}
TINY = RELEASED | {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 2,
    "num_experts": [6],
    "moe_gate_norm_std": 0.7,
    "vocab_size": 320,
    "max_position_embeddings": 256,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 258,
    "torch_dtype": "float32",
}


def released_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Skywork-MoE checkpoint, by its released name."""
    h, v, i, e = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["num_experts"][0]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        shapes |= {p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"}
        shapes[p + "block_sparse_moe.gate.weight"] = (e, h)
        for x in range(e):
            q = f"{p}block_sparse_moe.experts.{x}."
            shapes |= {q + "w1.weight": (i, h), q + "w3.weight": (i, h), q + "w2.weight": (h, i)}
    return shapes


def _skywork_router(target_std: float):
    """Mixtral's router forward with Skywork's logit normalisation in front (the patch)."""

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight)
        normed = logits / (logits.std(dim=-1, keepdim=True) / target_std)
        probs = torch.softmax(normed.float(), dim=-1)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), index

    return forward


def oracle(cfg: dict, tensors: dict[str, torch.Tensor]) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        num_local_experts=cfg["num_experts"][0],
        num_experts_per_tok=2,
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=float(cfg["rope_theta"]),
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=False,
    )
    model = MixtralForCausalLM(config).eval()
    # Mixtral's own fused layout in memory: gate rows (w1) then up rows (w3), per expert
    state = {}
    for name, t in tensors.items():
        if ".experts." in name:
            continue
        state[name.replace(".block_sparse_moe.", ".mlp.")] = t
    e = cfg["num_experts"][0]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}.block_sparse_moe.experts."
        state[f"model.layers.{n}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{p}{x}.w1.weight"], tensors[f"{p}{x}.w3.weight"]]) for x in range(e)]
        )
        state[f"model.layers.{n}.mlp.experts.down_proj"] = torch.stack(
            [tensors[f"{p}{x}.w2.weight"] for x in range(e)]
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    for layer in model.model.layers:
        layer.mlp.gate.forward = types.MethodType(_skywork_router(cfg["moe_gate_norm_std"]), layer.mlp.gate)
    return model


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("skywork")
    tensors = random_tensors(released_shapes(TINY), seed=1)
    marker = root / "marker"
    folder = write_released(root / "tiny", TINY, tensors, trap="modeling_skywork_moe", marker=marker)
    (folder / "configuration_skywork_moe.py").write_text((folder / "modeling_skywork_moe.py").read_text())
    return folder, hf_greedy(oracle(TINY, tensors)), marker, tensors


def test_the_normalisation_changes_the_tokens(released):
    """Without the patch Mixtral decodes differently: the test exercises Skywork's gating."""
    _, want, _, tensors = released
    plain = TINY | {"moe_gate_norm_std": 1.0}
    model = oracle(plain, tensors)
    for layer in model.model.layers:
        del layer.mlp.gate.forward  # back to Mixtral's own router
    assert hf_greedy(model) != want


def test_moe_local_is_exact_in_memory_budgeted_and_quantizes(released, tmp_path):
    folder, want, marker, _ = released
    check_exact_everywhere(folder, want, marker, tmp_path)


def test_layouts_without_a_release_are_refused_in_one_line(released, tmp_path):
    import json
    import shutil

    folder = tmp_path / "two-layer-gate"
    shutil.copytree(released[0], folder)
    (folder / "config.json").write_text(json.dumps(TINY | {"moe_2layer_gate": True}))
    with pytest.raises(CheckpointError) as info:
        load_config(folder)
    assert "moe_2layer_gate" in str(info.value) and "\n" not in str(info.value)


def test_inspect_gives_the_released_totals(tmp_path):
    folder = tmp_path / "146b"
    check_raw(RELEASED, folder / "config.json")
    try:
        headers_only_checkpoint(folder, RELEASED, released_shapes(RELEASED))
    except OSError as exc:
        pytest.skip(f"this filesystem cannot hold a 290 GB sparse file: {exc}")
    info = inspect_model(folder)
    assert info.family == "skywork_moe" and info.experts_per_layer == 16 and info.top_k == 2
    assert info.moe_layers == 52
    assert 145e9 < info.total_params < 147e9, info.total_params
    assert 21.5e9 < info.active_params < 23e9, info.active_params
