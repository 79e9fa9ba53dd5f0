"""``quantize --imatrix``: rtn/hqq rules weighted by calibration statistics, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_local.convert.calibration import collect_calibration
from moe_local.convert.writer import quantize_checkpoint
from moe_local.errors import MoeLocalError
from moe_local.loading.loader import load
from moe_local.quant.importance import ImportanceAccumulator
from moe_local.recipes import load_recipe
from tests.helpers import assert_one_line_error, run_cli

RECIPE = (
    '[[rule]]\nmatch = "*.experts.*"\nscheme = "int3-g16"\n'
    '[[rule]]\nmatch = "*.self_attn.*"\nscheme = "int3-g16"\n'
)


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    return path


def test_calibration_collects_importance_for_the_names_asked(tiny_mixtral, calibration_text):
    q = "model.layers.0.self_attn.q_proj.weight"
    o = "model.layers.0.self_attn.o_proj.weight"
    cal = collect_calibration(tiny_mixtral, calibration_text, {q}, max_tokens=256, importance_names={q, o})
    assert set(cal.dense) == {q} and set(cal.importance) == {o}  # a Hessian already holds the diagonal
    acc = cal.importance[o]
    assert isinstance(acc, ImportanceAccumulator) and acc.count == 256
    assert bool((acc.importance() > 0).all())


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_imatrix_lowers_the_logit_error(tiny_mixtral, tmp_path, calibration_text, recipe_file, method):
    recipe = load_recipe(str(recipe_file)).with_method(method)
    report = quantize_checkpoint(
        tiny_mixtral,
        tmp_path / "w",
        recipe,
        calibration=calibration_text,
        calibration_tokens=2048,
        imatrix=True,
    )
    quantize_checkpoint(tiny_mixtral, tmp_path / "p", recipe)
    assert report.calibration_tokens == 2048
    manifest = json.loads((tmp_path / "w" / "moe_local.json").read_text())
    assert manifest["run"]["options"]["imatrix"] is True
    plain_manifest = json.loads((tmp_path / "p" / "moe_local.json").read_text())
    assert "imatrix" not in plain_manifest["run"]["options"]  # a run without it records what it always did
    ref, w, p = load(tiny_mixtral), load(tmp_path / "w"), load(tmp_path / "p")
    ids = torch.tensor([ref.tokenizer.encode(calibration_text.read_text()[-2000:])[:200]])
    with torch.no_grad():
        want = ref.model(ids).logits
        err_w = float((w.model(ids).logits - want).norm() / want.norm())
        err_p = float((p.model(ids).logits - want).norm() / want.norm())
    assert err_w < err_p, (err_w, err_p)


def test_imatrix_needs_calibration(tiny_mixtral, tmp_path, recipe_file):
    with pytest.raises(MoeLocalError, match="--calibration"):
        quantize_checkpoint(tiny_mixtral, tmp_path / "q", load_recipe(str(recipe_file)), imatrix=True)


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--imatrix"], ("--imatrix", "--calibration")),
        (
            ["--imatrix", "--calibration", "CAL", "--recipe", "RECIPE", "--method", "nf4"],
            ("--imatrix", "rtn and hqq"),
        ),
        (["--imatrix", "--format", "gptq"], ("--format gptq", "--imatrix")),
    ],
)
def test_imatrix_cli_refusals(tiny_mixtral, tmp_path, capsys, calibration_text, recipe_file, flags, needles):
    flags = [{"CAL": str(calibration_text), "RECIPE": str(recipe_file)}.get(f, f) for f in flags]
    code, _, err = run_cli(capsys, "quantize", str(tiny_mixtral), str(tmp_path / "q"), *flags)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_imatrix_cli(tiny_mixtral, tmp_path, capsys, calibration_text, recipe_file):
    args = ["quantize", str(tiny_mixtral), str(tmp_path / "q"), "--recipe", str(recipe_file)]
    args += [
        "--method",
        "hqq",
        "--imatrix",
        "--calibration",
        str(calibration_text),
        "--calibration-tokens",
        "256",
    ]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert (tmp_path / "q" / "moe_local.json").exists() and "calibration: 256 tokens" in out
