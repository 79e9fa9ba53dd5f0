"""Quantized embedding tables: the lookup, quantize writes them, load ties the lm_head to the same table."""

from __future__ import annotations

import json

import pytest
import torch

from moe_local.config import LoadOptions
from moe_local.convert.writer import quantize_checkpoint
from moe_local.errors import MoeLocalError
from moe_local.loading.loader import load
from moe_local.quant import quantize
from moe_local.quant.embedding import QuantEmbedding
from moe_local.quant.linear import QuantLinear
from moe_local.quant.schemes import parse_qtype
from moe_local.recipes import load_recipe


@pytest.mark.parametrize("scheme", ["int8-g64", "int4-g32k-hqq"])
def test_lookup_equals_the_dequantized_rows(scheme):
    table = quantize(torch.randn(100, 64) * 0.05, parse_qtype(scheme))
    emb = QuantEmbedding(table, torch.bfloat16)
    ids = torch.tensor([[3, 99, 3, 0], [7, 7, 42, 1]])
    got = emb(ids)
    assert got.shape == (2, 4, 64) and got.dtype == torch.bfloat16
    assert torch.equal(got, table.dequantize()[ids].to(torch.bfloat16))
    with pytest.raises(IndexError, match="out of range"):
        emb(torch.tensor([100]))


def test_lookup_works_from_a_kernel_layout_too(monkeypatch):
    from moe_local.quant import native

    monkeypatch.setattr(native, "supports", lambda *args: False)  # torch's int4 layout instead
    table = quantize(torch.randn(64, 128) * 0.05, parse_qtype("int4-g64"))
    ids = torch.tensor([5, 1, 5, 63])
    want = table.dequantize()[ids]
    if not table.prepare_kernel(torch.bfloat16) or table._packed is not None:
        pytest.skip("torch's int4 CPU layout is not available or not reversible here")
    assert torch.equal(QuantEmbedding(table, torch.float32)(ids), want)


def _recipe(tmp_path, rules: str):
    path = tmp_path / "r.toml"
    path.write_text(rules + '[[rule]]\nmatch = "*"\nscheme = "keep"\n')
    return load_recipe(str(path))


EMBED_RULES = (
    '[[rule]]\nmatch = "*.experts.*"\nscheme = "int8-g16"\n'
    '[[rule]]\nmatch = "model.embed_tokens.*"\nscheme = "int8-g16"\n'
)


@pytest.mark.parametrize("family", ["mixtral", "grok-1"])  # untied, and tied to the lm_head
def test_quantized_table_loads_and_matches_the_source(tiny_checkpoint, tmp_path, family):
    src = tiny_checkpoint(family)
    recipe = _recipe(tmp_path, EMBED_RULES)
    dry = quantize_checkpoint(src, tmp_path / "dry", recipe, dry_run=True)
    report = quantize_checkpoint(src, tmp_path / "q", recipe)
    assert dry.bytes_out == report.bytes_out
    schemes = json.loads((tmp_path / "q" / "moe_local.json").read_text())["dense"]
    assert schemes["model.embed_tokens.weight"] == "int8-g16"
    lm = load(tmp_path / "q", LoadOptions(dtype="float32"))
    emb = lm.model.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding)
    if lm.model.config.tie_word_embeddings:
        head = lm.model.get_output_embeddings()
        assert isinstance(head, QuantLinear) and head.quantized() is emb.quantized()  # one copy
    ref = load(src, LoadOptions(dtype="float32"))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        want, got = ref.model(ids).logits, lm.model(ids).logits
    assert float((got - want).norm() / want.norm()) < 0.03  # 8-bit table and experts


def test_a_scheme_a_table_cannot_take_is_refused_before_writing(tiny_mixtral, tmp_path):
    recipe = _recipe(tmp_path, '[[rule]]\nmatch = "model.embed_tokens.*"\nscheme = "nf4"\n')
    with pytest.raises(MoeLocalError, match="embedding table takes group-wise"):
        quantize_checkpoint(tiny_mixtral, tmp_path / "q", recipe)
    assert not (tmp_path / "q").exists()


def test_tables_stay_kept_unless_a_rule_names_them(tiny_mixtral, tmp_path):
    recipe = _recipe(tmp_path, '[[rule]]\nmatch = "*"\nscheme = "int4-g16"\n')  # protected: 8+ bits
    quantize_checkpoint(tiny_mixtral, tmp_path / "q", recipe)
    schemes = json.loads((tmp_path / "q" / "moe_local.json").read_text())["dense"]
    assert schemes["model.embed_tokens.weight"] == "keep"
