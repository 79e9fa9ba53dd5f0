"""Mixed precision by measured error: recipe ``choose`` rules, the allocation, and a checkpoint end to end."""

from __future__ import annotations

import json

import pytest
import torch

from moe_local.convert.allocate import Unit, choose_schemes
from moe_local.convert.writer import quantize_checkpoint
from moe_local.errors import MoeLocalError
from moe_local.loading.loader import load
from moe_local.quant import bits_per_weight
from moe_local.quant.schemes import parse_qtype
from moe_local.recipes import load_recipe
from tests.helpers import assert_one_line_error, run_cli

T, I2, I3 = (parse_qtype(n) for n in ("tern-g64k-hqq", "int2-g32k-hqq", "int3-g32k-hqq"))
CHOICE = '[[rule]]\nmatch = "*.experts.*"\nchoose = ["tern-g64k-hqq", "int2-g32k-hqq", "int3-g32k-hqq"]\n'


def _recipe(tmp_path, text: str):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return load_recipe(str(path))


def test_the_cheapest_error_per_bit_is_bought_first():
    # bits: tern 1.975, int2 2.625, int3 3.625. Budget 2.6 over 300 params = 780 bits; all tern = 592.5.
    a = Unit("a", 0, 100, {T: 0.50, I2: 0.20, I3: 0.05})  # to int2: 0.30 saved for 65 bits
    b = Unit("b", 0, 100, {T: 0.40, I2: 0.35, I3: 0.10})  # to int2: 0.05/65; to int3: 0.30/165
    c = Unit("c", 1, 100, {T: 0.10, I2: 0.09, I3: 0.08})  # barely gains
    pick, bits = choose_schemes([a, b, c], 2.6)
    # a -> int2 (0.00462/bit) = 657.5 bits; then a -> int3 (0.15/100 = 0.0015) vs b -> int3
    # (0.30/165 = 0.00182): b -> int3 costs 822.5 > 780, so a -> int3 = 757.5; nothing else fits
    assert pick == {"a": I3, "b": T, "c": T}
    assert bits == pytest.approx((3.625 + 1.975 + 1.975) / 3)
    assert bits <= 2.6


def test_a_budget_below_the_cheapest_scheme_is_refused():
    with pytest.raises(MoeLocalError, match=r"cheapest schemes already cost 1\.975"):
        choose_schemes([Unit("a", 0, 10, {T: 0.5, I2: 0.2})], 1.9)


def test_higher_bits_that_do_not_lower_the_error_are_never_bought():
    pick, _ = choose_schemes([Unit("a", 0, 10, {T: 0.5, I2: 0.6, I3: 0.7})], 3.6)
    assert pick == {"a": T}


def test_recipe_choose_rules_parse_and_refuse_what_they_cannot_mean(tmp_path):
    rec = _recipe(tmp_path, CHOICE + "bits = 2.6\n")
    rule = rec.rules[0]
    assert rule.choices == (T, I2, I3) and rule.bits == 2.6 and rule.scheme == I2  # nearest in bits
    assert rule.label == "choose(tern-g64k-hqq|int2-g32k-hqq|int3-g32k-hqq)@2.6"
    assert rec.choice_rule_for("model.layers.0.mlp.experts.down") is rule
    assert rec.with_method("rtn").rules[0].choices[0] == parse_qtype("tern-g64k")
    bad = {
        "bits = 1.5\n": "outside what its schemes cost",
        "": "choose needs bits",
        'bits = 2.6\nscheme = "int4-g64"\n': "scheme or choose, not both",
    }
    for extra, message in bad.items():
        with pytest.raises(MoeLocalError, match=message):
            _recipe(tmp_path, CHOICE + extra)
    with pytest.raises(MoeLocalError, match="expert tensors"):
        _recipe(tmp_path, '[[rule]]\nmatch = "*.self_attn.*"\nchoose = ["int4-g64", "int8-g64"]\nbits = 5\n')
    with pytest.raises(MoeLocalError, match="group-wise schemes"):
        _recipe(tmp_path, '[[rule]]\nmatch = "*.experts.*"\nchoose = ["nf4", "int8-g64"]\nbits = 5\n')


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_checkpoint_gets_the_measured_mix_within_its_bits(
    tiny_mixtral, tmp_path, calibration_text, calibrated
):
    recipe = _recipe(tmp_path, CHOICE + "bits = 2.9\n")
    cal = dict(calibration=calibration_text, calibration_tokens=512, imatrix=True) if calibrated else {}
    report = quantize_checkpoint(tiny_mixtral, tmp_path / "q", recipe, **cal)
    alloc = report.allocation
    assert alloc is not None and alloc.bits <= 2.9
    assert ("calibration tokens" in alloc.measured_on) == calibrated
    assert ("against the residual stream" in alloc.measured_on) == calibrated  # the layers' h was measured
    manifest = json.loads((tmp_path / "q" / "moe_local.json").read_text())
    record = manifest["allocation"]
    assert record["target_bits"] == 2.9 and set(record["units"]) == {u.name for u in alloc.units}
    for layer, entry in manifest["layers"].items():  # what was written is what was chosen
        for part, scheme in entry["schemes"].items():
            unit = next(n for n in record["units"] if n.endswith(f"experts.{part}") and f".{layer}." in n)
            assert scheme == record["units"][unit]["scheme"]
    chosen = sum(u.errors[alloc.schemes[u.name]] for u in alloc.units)
    # the one uniform scheme under 2.9 bits: ternary (in groups of 32 where 64 does not divide)
    uniform = sum(u.errors[min(u.errors, key=bits_per_weight)] for u in alloc.units)
    assert chosen < uniform
    params = sum(u.params for u in alloc.units)
    spent = sum(u.params * bits_per_weight(alloc.schemes[u.name]) for u in alloc.units)
    assert spent / params == pytest.approx(alloc.bits)
    lm = load(tmp_path / "q")
    with torch.no_grad():
        logits = lm.model(torch.tensor([[1, 5, 9, 13]])).logits
    assert torch.isfinite(logits).all()


def test_the_cli_prints_the_allocation(tiny_mixtral, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(CHOICE + "bits = 2.9\n")
    code, out, err = run_cli(
        capsys, "quantize", str(tiny_mixtral), str(tmp_path / "q"), "--recipe", str(recipe)
    )
    assert code == 0, err
    assert "allocation (weights (no calibration text)):" in out and "bits/weight over 4 expert parts" in out
    code, out, _ = run_cli(
        capsys, "quantize", str(tiny_mixtral), str(tmp_path / "d"), "--recipe", str(recipe), "--dry-run"
    )
    assert code == 0 and "measured when quantizing" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(CHOICE + "bits = 9\n")
    code, _, err = run_cli(capsys, "quantize", str(tiny_mixtral), str(tmp_path / "x"), "--recipe", str(bad))
    assert_one_line_error(code, err, "bits = 9 is outside")
