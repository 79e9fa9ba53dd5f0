"""GPTQ through quantize: MoE-aware calibration reaches every expert and beats RTN."""

from __future__ import annotations

import json

import pytest
import torch

from moe_local.convert.calibration import LayerCalibration
from moe_local.convert.writer import quantize_checkpoint
from moe_local.errors import MoeLocalError
from moe_local.loading.loader import load
from moe_local.recipes import load_recipe
from tests.helpers import assert_one_line_error, run_cli

RECIPE = (
    '[[rule]]\nmatch = "*.experts.*"\nscheme = "int3-g16"\n'
    '[[rule]]\nmatch = "*.self_attn.*"\nscheme = "int3-g16"\n'
)


def test_gptq_beats_rtn_and_reports_tokens(tiny_mixtral, tmp_path, calibration_text):
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(RECIPE)
    recipe = load_recipe(str(recipe_file))
    gptq = quantize_checkpoint(
        tiny_mixtral,
        tmp_path / "g",
        recipe.with_method("gptq"),
        calibration=calibration_text,
        calibration_tokens=2048,
    )
    quantize_checkpoint(tiny_mixtral, tmp_path / "r", recipe)
    assert gptq.calibration_tokens == 2048
    assert set(gptq.tokens_per_expert) == {0, 1}
    assert all(len(seen) == 4 for seen in gptq.tokens_per_expert.values())
    ref, g, r = load(tiny_mixtral), load(tmp_path / "g"), load(tmp_path / "r")
    ids = torch.tensor([ref.tokenizer.encode(calibration_text.read_text()[-2000:])[:200]])
    with torch.no_grad():
        want = ref.model(ids).logits
        err_g = float((g.model(ids).logits - want).norm() / want.norm())
        err_r = float((r.model(ids).logits - want).norm() / want.norm())
    assert err_g < err_r, (err_g, err_r)


def test_starved_expert_gets_its_best_scoring_tokens():
    x = torch.randn(100, 8)
    idx = torch.zeros(100, 1, dtype=torch.long)
    idx[:3] = 1  # expert 1 is routed only 3 tokens
    router = torch.randn(2, 8)
    cal = LayerCalibration(x, idx, router, None, gate_fn=None, has_gate=True)
    inputs, routed = cal.tokens_for(1, min_tokens=20)
    assert routed == 3 and inputs.shape == (20, 8)
    assert torch.equal(inputs[:3], x[:3])
    extra_scores = inputs[3:] @ router[1]
    rest = (x[3:] @ router[1]).sort(descending=True).values[:17]
    assert torch.allclose(extra_scores.sort(descending=True).values, rest)
    full, routed0 = cal.tokens_for(0, min_tokens=20)
    assert routed0 == 97 and full.shape == (97, 8)


def test_gptq_without_calibration_is_refused(capsys, tiny_mixtral, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    args = [
        "quantize",
        str(tiny_mixtral),
        str(tmp_path / "q"),
        "--recipe",
        str(tmp_path / "r.toml"),
        "--method",
        "gptq",
    ]
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "--calibration")
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_act_order_is_applied_and_recorded(tiny_mixtral, tmp_path, calibration_text):
    (tmp_path / "r.toml").write_text(RECIPE)
    recipe = load_recipe(str(tmp_path / "r.toml"))
    with pytest.raises(MoeLocalError, match="--act-order applies to gptq rules"):
        quantize_checkpoint(tiny_mixtral, tmp_path / "x", recipe, act_order=True)
    gptq = recipe.with_method("gptq")
    common = dict(calibration=calibration_text, calibration_tokens=1024)
    quantize_checkpoint(tiny_mixtral, tmp_path / "a", gptq, act_order=True, **common)
    quantize_checkpoint(tiny_mixtral, tmp_path / "n", gptq, **common)
    run = json.loads((tmp_path / "a" / "moe_local.json").read_text())["run"]
    assert run["options"]["act_order"] is True
    a, n = load(tmp_path / "a"), load(tmp_path / "n")
    q_a = a.model.model.layers[0].self_attn.q_proj.quantized()
    q_n = n.model.model.layers[0].self_attn.q_proj.quantized()
    assert not torch.equal(q_a.dequantize(), q_n.dequantize())  # another column order, other codes
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert bool(torch.isfinite(a.model(ids).logits).all())


def test_act_order_flag_needs_a_gptq_rule(capsys, tiny_mixtral, tmp_path):
    code, _, err = run_cli(capsys, "quantize", str(tiny_mixtral), str(tmp_path / "q"), "--act-order")
    assert_one_line_error(code, err, "--act-order applies to gptq rules")
