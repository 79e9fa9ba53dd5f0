"""``--format gptq`` falls back per tensor instead of refusing a width the group size does not divide.

The fallbacks are written as ``quantization_config.dynamic``, the per-module overrides vLLM's and
GPTQModel's GPTQ loaders read: ``"+:regex": {"group_size": g}`` or ``"-:regex"`` (not quantized),
matched with ``re.match`` against vLLM's module names (q/k/v fused as ``qkv_proj``, a layer's
experts as one ``...experts`` module) and GPTQModel's (each linear).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from moe_local.config import LoadOptions, SamplingParams
from moe_local.convert.gptq_export import export_gptq
from moe_local.format.safetensors_io import CheckpointFiles
from moe_local.generation import generate
from moe_local.loading.loader import load
from tests.helpers import run_cli

ATTN = "model.layers.{}.self_attn.{}"
EXPERTS = "model.layers.{}.block_sparse_moe.experts"


def _override(dynamic: dict, module: str):
    """What a ``dynamic`` entry says for ``module`` as vLLM reads it: False (skip), a dict, or None."""
    for pattern, values in dynamic.items():
        if pattern.startswith("-:") and re.match(pattern[2:], module):
            return False
        if not pattern.startswith("-:") and re.match(pattern.removeprefix("+:"), module):
            return values
    return None


def _config(out):
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert json.loads((out / "quantize_config.json").read_text()) == q
    return q


@pytest.fixture(scope="module")
def o_proj_252(tiny_checkpoint):
    """Mixtral-shaped, 2 heads of 126: o_proj has 252 inputs, which no group of 32 or more divides."""
    return tiny_checkpoint("mixtral", num_attention_heads=2, num_key_value_heads=2, head_dim=126)


def test_a_width_no_group_divides_is_kept_and_excluded(o_proj_252, tmp_path):
    src = CheckpointFiles(o_proj_252)
    out = export_gptq(o_proj_252, tmp_path / "g", 8, 32)
    q = _config(out)
    assert q["group_size"] == 32
    files = CheckpointFiles(out)
    for layer in (0, 1):
        o_proj = ATTN.format(layer, "o_proj")
        assert _override(q["dynamic"], o_proj) is False
        assert f"{o_proj}.qweight" not in files.names()
        assert files.info(f"{o_proj}.weight").dtype == src.info(f"{o_proj}.weight").dtype
        assert torch.equal(files.read(f"{o_proj}.weight"), src.read(f"{o_proj}.weight"))
        for name in ("q_proj", "k_proj", "v_proj", "qkv_proj"):  # quantized as asked: no override
            assert _override(q["dynamic"], ATTN.format(layer, name)) is None
        assert _override(q["dynamic"], EXPERTS.format(layer)) is None
        q_proj = ATTN.format(layer, "q_proj")
        assert tuple(files.info(f"{q_proj}.scales").shape) == (32 // 32, 252)  # hidden 32, groups of 32
    assert len(q["dynamic"]) == 2
    lm = load(out, LoadOptions(dtype="float32"))
    ids = torch.tensor([list(range(3, 15))])
    with torch.no_grad():
        a, b = load(o_proj_252).model(ids).logits, lm.model(ids).logits
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.99
    assert len(generate(lm, [5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True)).tokens) == 6


def test_a_smaller_group_is_taken_where_one_divides(tiny_checkpoint, tmp_path):
    # hidden 32 and o_proj of 96 inputs: neither is divided by 64, both by 32
    src = tiny_checkpoint("mixtral", num_attention_heads=2, num_key_value_heads=2, head_dim=48)
    out = export_gptq(src, tmp_path / "g", 4, 64)
    q = _config(out)
    assert q["group_size"] == 64
    files = CheckpointFiles(out)
    for name in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj"):
        assert _override(q["dynamic"], ATTN.format(0, name)) == {"group_size": 32}
    # the experts of a layer share one scheme (vLLM runs them as one fused module): w1/w3 (32 inputs)
    # need 32, so w2 (64 inputs) takes 32 too
    for module in (EXPERTS.format(0), EXPERTS.format(0) + ".3.w2"):
        assert _override(q["dynamic"], module) == {"group_size": 32}
    assert _override(q["dynamic"], "model.layers.0.block_sparse_moe.gate") is None
    w2 = EXPERTS.format(1) + ".0.w2"
    assert tuple(files.info(f"{w2}.scales").shape) == (64 // 32, 32)
    assert torch.equal(files.read(f"{w2}.g_idx"), torch.arange(64, dtype=torch.int32) // 32)
    lm = load(out, LoadOptions(dtype="float32"))
    with torch.no_grad():
        a = load(src).model(torch.tensor([[3, 4, 5, 6]])).logits
        b = lm.model(torch.tensor([[3, 4, 5, 6]])).logits
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.95


def test_the_cli_summary_lists_the_fallbacks(o_proj_252, tmp_path, capsys):
    out = tmp_path / "g"
    code, text, err = run_cli(
        capsys, "quantize", str(o_proj_252), str(out), "--format", "gptq", "--bits", "8", "--group-size", "32"
    )
    assert code == 0, err
    assert "kept unquantized (no GPTQ group fits its shape, or its .weight is read): " in text
    assert "model.layers.0.self_attn.o_proj" in text
