"""Grok-1 (``model_type: "grok-1"``): exact against a reference forward written here from xAI's equations.

The oracle below follows xai-org/grok-1's ``model.py`` step by step in plain torch (full sequence,
no cache), apart from the package: it takes only config values and the checkpoint's tensors. The
tiny checkpoint has the layout of the community PyTorch port hpcai-tech/grok-1 (its config.json
keys and tensor names), which maps one to one onto the reference's parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_local.inspection import inspect_model
from moe_local.loading.validate import check_raw
from tests.models.released import (
    PROMPT,
    TOKENS,
    check_exact_everywhere,
    headers_only_checkpoint,
    random_tensors,
    write_released,
)

# config.json of hpcai-tech/grok-1 (Grok-1's real dimensions, the reference's run.py values); it
# names no model_type, only its architecture: moe-local recognises the family by that name.
RELEASED = {
    "architectures": ["Grok1ModelForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_grok1.Grok1Config",
        "AutoModel": "modeling_grok1.Grok1Model",
        "AutoModelForCausalLM": "modeling_grok1.Grok1ModelForCausalLM",
    },
    "vocab_size": 131072,
    "hidden_size": 6144,
    "intermediate_size": 32768,
    "num_hidden_layers": 64,
    "num_attention_heads": 48,
    "num_key_value_heads": 8,
    "attn_output_multiplier": 0.08838834764831845,
    "embedding_multiplier_scale": 78.38367176906169,
    "output_multiplier_scale": 0.5773502691896257,
    "max_attn_value": 30.0,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "use_cache": True,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": True,
    "num_experts_per_tok": 2,
    "num_experts": 8,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.35.0",
}
TINY = RELEASED | {
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "attn_output_multiplier": 8**-0.5,
    "embedding_multiplier_scale": math.sqrt(32),
    "max_attn_value": 2.0,  # low enough that the soft cap changes the tiny model's logits
    "num_experts": 4,
    "max_position_embeddings": 256,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 258,
    "torch_dtype": "float32",
}


def released_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Grok-1 checkpoint in the port's layout (the output embedding is tied)."""
    h, v, i, e = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["num_experts"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.scale": (h,)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + f"{x}.scale": (h,)
            for x in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm")
        }
        shapes |= {p + "attn.q_proj.weight": (h, h), p + "attn.k_proj.weight": (kv, h)}
        shapes |= {p + "attn.v_proj.weight": (kv, h), p + "attn.o_proj.weight": (h, h)}
        shapes[p + "moe_block.gate.weight"] = (e, h)
        for x in range(e):
            q = f"{p}moe_block.experts.{x}."
            shapes |= {
                q + "linear.weight": (i, h),
                q + "linear_v.weight": (i, h),
                q + "linear_1.weight": (h, i),
            }
    return shapes


# ---- the reference forward, from xai-org/grok-1 model.py (names as there) ----


def rms_norm(x, scale, eps):
    x = x.float()
    normed = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return scale.float() * normed


def rotary(x, positions, base=10000):
    """RotaryEmbedding.__call__: phase tiled twice, x * cos + rotate_half(x) * sin; x is [T, heads, D]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    phase = positions.float()[:, None] * inv_freq[None, :]
    phase = torch.cat([phase, phase], dim=-1)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * phase.cos() + torch.cat([-x2, x1], dim=-1) * phase.sin()


def reference_logits(cfg: dict, w: dict[str, torch.Tensor], tokens: list[int]) -> torch.Tensor:
    """LanguageModel.__call__ for one sequence: [T] tokens -> [T, V] logits."""
    eps, nq, nkv = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // nq
    t = len(tokens)
    h = w["model.embed_tokens.weight"][tokens] * cfg["embedding_multiplier_scale"]
    pos = torch.arange(t)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        x = rms_norm(h, w[p + "pre_attn_norm.scale"], eps)
        q = rotary((x @ w[p + "attn.q_proj.weight"].T).view(t, nkv, nq // nkv, d).flatten(1, 2), pos)
        k = rotary((x @ w[p + "attn.k_proj.weight"].T).view(t, nkv, d), pos)
        v = (x @ w[p + "attn.v_proj.weight"].T).view(t, nkv, d)
        q = q.view(t, nkv, nq // nkv, d)  # "...thHd": h kv heads, H query heads per kv head
        logits = torch.einsum("thHd,Thd->hHtT", q, k).float() * cfg["attn_output_multiplier"]
        cap = cfg["max_attn_value"]
        logits = cap * torch.tanh(logits / cap)
        logits = torch.where(causal, logits, torch.tensor(-1e30))
        attn = torch.einsum("hHtT,Thd->thHd", torch.softmax(logits, dim=-1), v).reshape(t, -1)
        h = h + rms_norm(attn @ w[p + "attn.o_proj.weight"].T, w[p + "post_attn_norm.scale"], eps)
        x = rms_norm(h, w[p + "pre_moe_norm.scale"], eps)
        probs = torch.softmax(x.float() @ w[p + "moe_block.gate.weight"].float().T, dim=-1)
        gate, index = torch.topk(probs, cfg["num_experts_per_tok"], dim=-1)
        out = torch.zeros_like(x)
        for tok in range(t):
            for slot in range(cfg["num_experts_per_tok"]):
                e = f"{p}moe_block.experts.{int(index[tok, slot])}."
                y = F.gelu(x[tok] @ w[e + "linear.weight"].T, approximate="tanh") * (
                    x[tok] @ w[e + "linear_v.weight"].T
                )
                out[tok] += gate[tok, slot] * (y @ w[e + "linear_1.weight"].T)
        h = h + rms_norm(out, w[p + "post_moe_norm.scale"], eps)
    h = rms_norm(h, w["model.norm.scale"], eps)
    return (h @ w["model.embed_tokens.weight"].T) * cfg["output_multiplier_scale"]


def reference_greedy(cfg: dict, w: dict[str, torch.Tensor]) -> list[int]:
    seq = list(PROMPT)
    for _ in range(TOKENS):
        seq.append(int(reference_logits(cfg, w, seq)[-1].argmax()))
    return seq[len(PROMPT) :]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("grok")
    tensors = random_tensors(released_shapes(TINY), seed=2)
    marker = root / "marker"
    folder = write_released(root / "tiny", TINY, tensors, trap="modeling_grok1", marker=marker)
    (folder / "configuration_grok1.py").write_text((folder / "modeling_grok1.py").read_text())
    return folder, reference_greedy(TINY, tensors), marker, tensors


def test_package_model_matches_the_reference_logits(released):
    """The package's forward against the reference's, on every position (not only the argmax)."""
    from moe_local.models import register_families
    from moe_local.models.grok import Grok1ForCausalLM

    register_families()  # the family's conversion mapping (per-expert tensors -> fused experts)
    folder, _, marker, tensors = released
    model = Grok1ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seq = [*PROMPT, 11, 12, 13]
    with torch.no_grad():
        got = model(torch.tensor([seq]), use_cache=False).logits[0]
    torch.testing.assert_close(got, reference_logits(TINY, tensors, seq), rtol=1e-4, atol=1e-4)
    assert not marker.exists()


def test_the_soft_cap_is_active(released):
    """The tiny config's attention logits reach the cap: without it the reference computes otherwise."""
    _, _, _, tensors = released
    seq = [*PROMPT, 11, 12, 13]
    capped = reference_logits(TINY, tensors, seq)
    uncapped = reference_logits(TINY | {"max_attn_value": 1e6}, tensors, seq)
    assert (capped - uncapped).abs().max() > 1e-2


def test_moe_local_is_exact_in_memory_budgeted_and_quantizes(released, tmp_path):
    folder, want, marker, _ = released
    check_exact_everywhere(folder, want, marker, tmp_path)


def test_inspect_gives_the_released_totals(tmp_path):
    folder = tmp_path / "314b"
    check_raw(RELEASED, folder / "config.json")
    try:
        headers_only_checkpoint(folder, RELEASED, released_shapes(RELEASED))
    except OSError as exc:
        pytest.skip(f"this filesystem cannot hold a 630 GB sparse file: {exc}")
    info = inspect_model(folder)
    assert info.family == "grok-1" and info.experts_per_layer == 8 and info.top_k == 2
    assert info.moe_layers == 64
    assert 314e9 < info.total_params < 317e9, info.total_params
    assert 78e9 < info.active_params < 88e9, info.active_params


def test_cli_runs_the_port_without_its_code(capsys, monkeypatch, released):
    """``inspect`` and ``generate`` on the port's folder (auto_map, no model_type), "y" on stdin."""
    import io
    import sys

    from tests.helpers import run_cli

    folder, _, marker, _ = released
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 8))
    code, out, err = run_cli(capsys, "inspect", str(folder))
    assert code == 0, err
    assert "Grok1ForCausalLM" in out and "grok-1" in out
    code, out, err = run_cli(capsys, "generate", str(folder), "hi", "-n", "3", "--no-chat")
    assert code == 0, err
    assert "[y/N]" not in out + err
    assert not marker.exists(), "code from the model folder ran"
