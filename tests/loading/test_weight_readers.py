"""Families whose forward reads a projection's ``.weight``: quantize keeps those modules, and generates.

transformers 5.24's DSA indexer (deepseek_v32, glm_moe_dsa, axk2, hy_v4; dots3_note too, whose tiny
model is too large to build here) casts its input to ``weights_proj.weight.dtype`` and hy_v4's
causal LM to ``lm_head.weight.dtype``; a ``QuantLinear`` has no ``.weight``, so quantizing them
failed with ``'QuantLinear' object has no attribute 'weight'``.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from moe_local.config import LoadOptions, SamplingParams
from moe_local.convert.gptq_export import export_gptq
from moe_local.convert.writer import quantize_checkpoint
from moe_local.format.safetensors_io import CheckpointFiles
from moe_local.generation import generate
from moe_local.loading.loader import load
from moe_local.quant import QuantLinear
from moe_local.recipes import WEIGHT_READ_REASON, forward_weight_reads, load_recipe
from moe_local.tiny import make_tiny_checkpoint

FAMILIES = {
    "deepseek_v32": {"indexer.weights_proj"},
    "glm_moe_dsa": {"indexer.weights_proj"},
    "axk2": {"indexer.weights_proj"},
    "hy_v4": {"indexer.weights_proj", "lm_head"},
}
PROMPT = [5, 6, 7, 8, 9]
# these attentions (MLA) have one key/value head a query head: tiny.py's default of 2 for 4 breaks
# transformers' own forward in all but hy_v4
OVERRIDES = {"num_key_value_heads": 4}


class _Reads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.other = nn.Linear(4, 4)

    def forward(self, x):
        return self.other(self.proj(x.to(self.proj.weight.dtype)))


def test_forward_weight_reads_finds_only_what_forward_reads():
    model = nn.Sequential(_Reads(), nn.Linear(4, 4))
    assert forward_weight_reads(model) == {"0.proj.weight": WEIGHT_READ_REASON}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_quantize_keeps_what_forward_reads_and_generates(model_type, tmp_path):
    src = make_tiny_checkpoint(model_type, tmp_path / model_type, **OVERRIDES)
    out = tmp_path / "q"
    report = quantize_checkpoint(src, out, load_recipe("experts-4bit"))  # attention int8, lm_head int8
    dense = json.loads((out / "moe_local.json").read_text())["dense"]
    kept = {n for n, s in dense.items() if n.endswith(".weight") and s == "keep"}
    for suffix in FAMILIES[model_type]:
        assert any(n.endswith(f"{suffix}.weight") for n in kept), suffix
    assert any(s.startswith("int8") for n, s in dense.items() if ".self_attn." in n)  # the rest is quantized
    assert f"keep ({WEIGHT_READ_REASON})" in report.rows
    lm = load(out, LoadOptions(dtype="float32"))
    modules = dict(lm.model.named_modules())
    for name in kept:
        assert not isinstance(modules.get(name.removesuffix(".weight")), QuantLinear)
    assert any(isinstance(m, QuantLinear) for m in modules.values())
    tokens = generate(lm, PROMPT, SamplingParams(max_tokens=8, ignore_eos=True)).tokens
    assert len(tokens) == 8
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        a = load(src, LoadOptions(dtype="float32")).model(ids).logits
        b = lm.model(ids).logits
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.9


def test_gptq_export_keeps_the_indexer_and_tells_the_loaders(tmp_path):
    src = make_tiny_checkpoint("deepseek_v32", tmp_path / "ds", **OVERRIDES)
    out = export_gptq(src, tmp_path / "g", 8, 16)
    dynamic = json.loads((out / "quantize_config.json").read_text())["dynamic"]
    assert "-:^model\\.layers\\.0\\.self_attn\\.indexer\\.weights_proj$" in dynamic  # vLLM: not quantized
    assert "model.layers.0.self_attn.indexer.weights_proj.weight" in CheckpointFiles(out).names()
    lm = load(out, LoadOptions(dtype="float32"))
    assert len(generate(lm, PROMPT, SamplingParams(max_tokens=4, ignore_eos=True)).tokens) == 4
