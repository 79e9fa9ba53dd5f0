"""Issue 13: quantize never refuses a valid checkpoint, does what its flags say, stages without
changing numerics."""

from __future__ import annotations

import json

import pytest
import torch

from moe_local.config import LoadOptions, SamplingParams
from moe_local.convert.staging import is_staged_copy, prepare, staged_path
from moe_local.convert.writer import quantize_checkpoint
from moe_local.errors import MoeLocalError
from moe_local.generation import generate
from moe_local.loading.loader import load
from moe_local.recipes import load_recipe
from tests.helpers import assert_one_line_error, run_cli

IDS = list(range(3, 15))
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0)


@pytest.fixture(scope="module")
def wide_o_proj(tiny_checkpoint):
    """Mixtral-shaped, attention 2 heads of 126: o_proj has 252 inputs (no group size divides it)."""
    return tiny_checkpoint("mixtral", num_attention_heads=2, num_key_value_heads=2, head_dim=126)


def _manifest(folder):
    return json.loads((folder / "moe_local.json").read_text())


def test_o_proj_of_252_inputs_is_kept_and_the_rest_quantized(wide_o_proj, tmp_path, capsys):
    capsys.readouterr()
    recipe = load_recipe("experts-4bit")  # attention int8-g128: q_proj (32 wide) steps down to g32
    plan = quantize_checkpoint(wide_o_proj, tmp_path / "p", recipe, dry_run=True)
    code, out, err = run_cli(capsys, "quantize", str(wide_o_proj), str(tmp_path / "q"))
    assert code == 0, err
    dense = _manifest(tmp_path / "q")["dense"]
    assert dense["model.layers.0.self_attn.o_proj.weight"] == "keep"
    assert dense["model.layers.0.self_attn.q_proj.weight"] == "int8-g32"
    assert _manifest(tmp_path / "q")["layers"]["1"]["schemes"] == {
        "gate_up": "int4-g32-hqq",
        "down": "int4-g64-hqq",
    }
    label = "keep (for int8-g128)"
    assert plan.rows[label].tensors == 2  # one o_proj per layer, in the plan as in the summary
    assert label in out and "2 tensors kept: no group size divides their width" in out
    with torch.no_grad():
        a = load(wide_o_proj).model(torch.tensor([IDS])).logits
        b = load(tmp_path / "q", LoadOptions(dtype="float32")).model(torch.tensor([IDS])).logits
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.98


def test_bits_sets_the_experts_scheme_for_the_default_format(tiny_mixtral, tmp_path, capsys):
    out = tmp_path / "q2"
    code, text, err = run_cli(capsys, "quantize", str(tiny_mixtral), str(out), "--bits", "2")
    assert code == 0, err
    m = _manifest(out)
    assert m["layers"]["0"]["schemes"] == {"gate_up": "int2-g32-hqq", "down": "int2-g64-hqq"}  # 32, 64 wide
    assert m["dense"]["model.layers.0.self_attn.q_proj.weight"] == "int8-g32"  # attention as the recipe says
    assert m["recipe"] == "experts-4bit+experts-int2-g64-hqq"
    assert m["run"]["recipe"]["rules"][0] == ["*.experts.*", "int2-g64-hqq"]
    assert "rules: *.experts.* int2-g64-hqq, *.experts.* int4-g64-hqq" in text
    # the same bytes as a recipe that says int2-g64-hqq for the experts
    rec = tmp_path / "r.toml"
    rec.write_text(
        '[[rule]]\nmatch = "*.experts.*"\nscheme = "int2-g64-hqq"\n'
        '[[rule]]\nmatch = "*.self_attn.*"\nscheme = "int8-g128"\n[[rule]]\nmatch = "*"\nscheme = "keep"\n'
    )
    quantize_checkpoint(tiny_mixtral, tmp_path / "r", load_recipe(str(rec)))
    for layer in m["layers"].values():
        assert (out / layer["file"]).read_bytes() == (tmp_path / "r" / layer["file"]).read_bytes()


def test_group_size_and_method_with_bits(tiny_mixtral, tmp_path, capsys):
    args = ["quantize", str(tiny_mixtral), str(tmp_path / "q"), "--group-size", "16", "--method", "rtn"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    m = _manifest(tmp_path / "q")
    assert m["layers"]["0"]["schemes"]["gate_up"] == "int4-g16"  # --method rtn, bits from the recipe
    assert m["dense"]["model.layers.0.self_attn.q_proj.weight"] == "int8-g32"


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--bits", "5"], ("--bits 5", "unsupported bits")),
        (["--group-size", "48"], ("unsupported group size",)),
        (["--method", "nf4", "--bits", "2"], ("--bits", "bitsandbytes")),
        (["--gptq-names", "gptqmodel"], ("--gptq-names", "--format gptq")),
        (["--calibration", "x.txt"], ("--calibration", "gptq")),
        (["--calibration-tokens", "64"], ("--calibration-tokens",)),
        (["--format", "gptq", "--recipe", "tiny-2bit"], ("--format gptq", "--recipe")),
        (["--format", "gptq", "--dry-run"], ("--format gptq", "--dry-run")),
        (["--format", "gptq", "--gpu", "rtx4090"], ("--format gptq", "--gpu")),
        (["--format", "gptq", "--method", "hqq"], ("--format gptq", "--method")),
    ],
)
def test_a_flag_that_does_not_apply_is_one_line(tiny_mixtral, tmp_path, capsys, flags, needles):
    code, _, err = run_cli(capsys, "quantize", str(tiny_mixtral), str(tmp_path / "q"), *flags)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_group_size_over_a_recipe_that_keeps_experts_needs_bits(tmp_path):
    rec = tmp_path / "keep.toml"
    rec.write_text('[[rule]]\nmatch = "*"\nscheme = "keep"\n')
    with pytest.raises(MoeLocalError, match="needs --bits"):
        load_recipe(str(rec)).with_experts(group_size=32)
    assert load_recipe(str(rec)).with_experts(bits=4).rules[0].scheme.full_name == "int4-g64"


def test_staged_copy_records_its_source(tiny_mixtral, tmp_path):
    folder = prepare(tiny_mixtral, tmp_path / "nvme")
    assert _manifest(folder)["staged"] == {"source": "unquantized", "dtype": "float32"}
    assert is_staged_copy(folder)
    q = tmp_path / "q"
    quantize_checkpoint(tiny_mixtral, q, load_recipe("experts-4bit"))
    assert "staged" not in _manifest(q) and not is_staged_copy(q)


def test_a_staged_copy_from_before_the_record_is_restaged(tiny_mixtral, tmp_path):
    folder = prepare(tiny_mixtral, tmp_path / "nvme")
    m = _manifest(folder)
    del m["staged"]
    (folder / "moe_local.json").write_text(json.dumps(m))
    assert not is_staged_copy(folder)
    assert prepare(tiny_mixtral, tmp_path / "nvme") == folder == staged_path(tiny_mixtral, tmp_path / "nvme")
    assert is_staged_copy(folder)


def test_offload_dir_keeps_the_source_numerics(tiny_mixtral, tmp_path):
    direct = load(prepare(tiny_mixtral, None))
    staged = load(prepare(tiny_mixtral, tmp_path / "nvme"))
    assert staged.model.dtype == direct.model.dtype == torch.float32
    assert generate(staged, IDS, GREEDY).tokens == generate(direct, IDS, GREEDY).tokens
