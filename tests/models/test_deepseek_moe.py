"""DeepSeek-MoE (``model_type: "deepseek"``): exact against transformers' Qwen2-MoE, loaded by moe-local.

The oracle is an exact mapping onto transformers' own ``qwen2_moe``: the same attention, norms,
router (softmax, top-k, renormalised only with ``norm_topk_prob``) and routed experts; its gated
shared expert becomes DeepSeek's ungated one with the gate weight zero (sigmoid(0) = 0.5) and the
shared down projection doubled (0.5 * 2 = 1, exact in binary floating point). The tiny checkpoint
has the released layout: config.json keys of deepseek-ai/deepseek-moe-16b-base and its tensor names.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from moe_local.inspection import inspect_model
from moe_local.loading.meta import build_on_meta
from moe_local.loading.validate import check_raw
from moe_local.models import register_families
from moe_local.models.deepseek_moe import DeepseekMoeForCausalLM
from tests.models.released import (
    check_exact_everywhere,
    headers_only_checkpoint,
    hf_greedy,
    random_tensors,
    write_released,
)

# config.json of deepseek-ai/deepseek-moe-16b-base as released (the model's real dimensions).
RELEASED = {
    "architectures": ["DeepseekForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "max_position_embeddings": 4096,
    "model_type": "deepseek",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 28,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
    "use_cache": True,
    "vocab_size": 102400,
}
TINY = RELEASED | {
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 3,
    "n_routed_experts": 8,
    "num_experts_per_tok": 3,
    "vocab_size": 320,
    "max_position_embeddings": 256,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "torch_dtype": "float32",
}


def released_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a DeepSeek-MoE checkpoint, by its released name."""
    h, v, i, mi = (
        cfg["hidden_size"],
        cfg["vocab_size"],
        cfg["intermediate_size"],
        cfg["moe_intermediate_size"],
    )
    shared = mi * cfg["n_shared_experts"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        shapes |= {p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"}
        if n >= cfg["first_k_dense_replace"] and n % cfg["moe_layer_freq"] == 0:
            shapes[p + "mlp.gate.weight"] = (cfg["n_routed_experts"], h)
            for e in range(cfg["n_routed_experts"]):
                q = f"{p}mlp.experts.{e}."
                shapes |= {
                    q + "gate_proj.weight": (mi, h),
                    q + "up_proj.weight": (mi, h),
                    q + "down_proj.weight": (h, mi),
                }
            q = p + "mlp.shared_experts."
            shapes |= {q + "gate_proj.weight": (shared, h), q + "up_proj.weight": (shared, h)}
            shapes[q + "down_proj.weight"] = (h, shared)
        else:
            shapes |= {p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h)}
            shapes[p + "mlp.down_proj.weight"] = (h, i)
    return shapes


def oracle_folder(folder, cfg: dict, tensors: dict[str, torch.Tensor]):
    """The same weights as a transformers qwen2_moe checkpoint that computes exactly DeepSeek-MoE."""
    qcfg = Qwen2MoeConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        shared_expert_intermediate_size=cfg["moe_intermediate_size"] * cfg["n_shared_experts"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        num_experts=cfg["n_routed_experts"],
        num_experts_per_tok=cfg["num_experts_per_tok"],
        norm_topk_prob=cfg["norm_topk_prob"],
        mlp_only_layers=list(range(cfg["first_k_dense_replace"])),
        decoder_sparse_step=1,
        qkv_bias=False,
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=float(cfg["rope_theta"]),
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    mapped = {}
    for name, t in tensors.items():
        if ".mlp.shared_experts." in name:
            name = name.replace(".shared_experts.", ".shared_expert.")
            t = 2 * t if name.endswith("down_proj.weight") else t
        mapped[name] = t
        if name.endswith("mlp.gate.weight"):  # the shared expert's gate: sigmoid(0) = 0.5
            mapped[name.replace("mlp.gate.", "mlp.shared_expert_gate.")] = torch.zeros(1, cfg["hidden_size"])
    folder.mkdir()
    qcfg.save_pretrained(folder)
    save_file(mapped, str(folder / "model.safetensors"), {"format": "pt"})
    return Qwen2MoeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(folder in the released layout, oracle greedy tokens, import marker)."""
    root = tmp_path_factory.mktemp("deepseek")
    tensors = random_tensors(released_shapes(TINY))
    marker = root / "marker"
    folder = write_released(root / "tiny", TINY, tensors, trap="modeling_deepseek", marker=marker)
    (folder / "configuration_deepseek.py").write_text((folder / "modeling_deepseek.py").read_text())
    oracle = oracle_folder(root / "oracle", TINY, tensors)
    return folder, hf_greedy(oracle), marker


def test_oracle_is_transformers_qwen2_moe(released):
    _, want, _ = released
    assert len(want) == 16 and len(set(want)) > 1  # a sequence that says something


def test_transformers_loads_it_with_the_package_class(released):
    """Registered, transformers' own from_pretrained builds moe-local's class, never the folder's."""
    from transformers import AutoModelForCausalLM

    folder, want, marker = released
    register_families()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()
    assert isinstance(model, DeepseekMoeForCausalLM)
    assert hf_greedy(model) == want
    assert not marker.exists()


def test_moe_local_is_exact_in_memory_budgeted_and_quantizes(released, tmp_path):
    folder, want, marker = released
    check_exact_everywhere(folder, want, marker, tmp_path)


def test_dense_and_moe_layers_follow_the_placement_rule():
    register_families()
    from transformers import AutoConfig

    cfg = {k: v for k, v in TINY.items() if k not in ("auto_map", "architectures", "model_type")}
    config = AutoConfig.for_model("deepseek", **(cfg | {"num_hidden_layers": 6, "moe_layer_freq": 2}))
    meta = build_on_meta(config, torch.float32)
    moe = [i for i, layer in enumerate(meta.model.layers) if hasattr(layer.mlp, "experts")]
    assert moe == [2, 4]  # layer >= first_k_dense_replace (1) and layer % moe_layer_freq (2) == 0


def test_inspect_gives_the_released_totals(tmp_path):
    folder = tmp_path / "16b"
    check_raw(RELEASED, folder / "config.json")
    try:
        headers_only_checkpoint(folder, RELEASED, released_shapes(RELEASED))
    except OSError as exc:
        pytest.skip(f"this filesystem cannot hold a 33 GB sparse file: {exc}")
    info = inspect_model(folder)
    assert info.family == "deepseek" and info.architecture == "DeepseekMoeForCausalLM"
    assert info.experts_per_layer == 64 and info.top_k == 6 and info.moe_layers == 27
    assert 16.3e9 < info.total_params < 16.5e9, info.total_params
    assert 2.7e9 < info.active_params < 2.9e9, info.active_params
    assert json.loads((folder / "config.json").read_text()) == RELEASED
