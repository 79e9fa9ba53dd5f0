"""moe-local quantize: the format round-trips, offloaded equals in-memory, errors are one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moe_local.config import LoadOptions, SamplingParams
from moe_local.convert.writer import quantize_checkpoint
from moe_local.errors import ExpertBlobError, MoeLocalError
from moe_local.format.blob import ALIGN
from moe_local.generation import generate
from moe_local.loading.loader import load
from moe_local.recipes import load_recipe
from tests.helpers import assert_one_line_error, run_cli

RECIPE = """
[[rule]]
match = "*.experts.*"
scheme = "{experts}"
[[rule]]
match = "*.self_attn.*"
scheme = "{attn}"
[[rule]]
match = "*"
scheme = "keep"
"""


def _recipe(tmp_path, experts="int8-g16", attn="int8-g16"):
    path = tmp_path / f"r-{experts}-{attn}.toml"
    path.write_text(RECIPE.format(experts=experts, attn=attn))
    return load_recipe(str(path))


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize(
    ("family", "experts", "min_cos"),
    [("mixtral", "int8-g16", 0.999), ("gpt_oss", "int8-g16", 0.999), ("mixtral", "int4-g16-hqq", 0.98)],
)
def test_quantized_logits_close_and_offload_identical(tiny_checkpoint, tmp_path, family, experts, min_cos):
    src = tiny_checkpoint(family)
    out = tmp_path / "q"
    report = quantize_checkpoint(src, out, _recipe(tmp_path, experts))
    assert not (tmp_path / "q.partial").exists()
    assert report.bytes_out < report.bytes_in
    ref, q = load(src), load(out, LoadOptions(dtype="float32"))
    one = q.store.get(q.sites[0].layer, 0).nbytes
    off = load(out, LoadOptions(dtype="float32", expert_memory=one))
    ids = torch.randint(0, 250, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = ref.model(ids).logits, q.model(ids).logits, off.model(ids).logits
    assert _cos(a, b) > min_cos
    assert torch.equal(b, c)
    p = SamplingParams(max_tokens=16, ignore_eos=True)
    assert generate(q, ids[0].tolist(), p).tokens == generate(off, ids[0].tolist(), p).tokens
    assert off.store.stats().total.misses > 0


def test_auto_dtype_of_a_quantized_folder_on_cpu_is_bf16(tiny_mixtral, tmp_path):
    # the CPU int4 kernel takes bf16 activations; unquantized checkpoints keep float32
    quantize_checkpoint(tiny_mixtral, tmp_path / "q", load_recipe("experts-4bit"))
    assert load(tmp_path / "q").model.dtype == torch.bfloat16
    assert load(tiny_mixtral).model.dtype == torch.float32


def test_manifest_and_alignment(tiny_mixtral, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(tiny_mixtral, out, _recipe(tmp_path))
    m = json.loads((out / "moe_local.json").read_text())
    assert m["format"] == "moe-local" and m["version"] == 2 and len(m["source"]["index_sha256"]) == 64
    assert m["dense"]["model.layers.0.self_attn.q_proj.weight"] == "int8-g16"
    assert m["dense"]["lm_head.weight"] == "keep"
    for layer in m["layers"].values():
        assert layer["schemes"]["gate_up"] == "int8-g16"
        for offset, length, _crc in layer["experts"]:
            assert offset % ALIGN == 0 and length > 0
    for f in ("config.json", "tokenizer.json", "dense.safetensors"):
        assert (out / f).exists()


def test_corrupt_blob_names_layer_and_expert(tiny_mixtral, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(tiny_mixtral, out, _recipe(tmp_path))
    m = json.loads((out / "moe_local.json").read_text())
    offset = m["layers"]["1"]["experts"][2][0]
    path = out / m["layers"]["1"]["file"]
    data = bytearray(path.read_bytes())
    data[offset + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ExpertBlobError, match=r"expert 2 of layer 1 .*checksum"):
        lm = load(out)
    lm = load(out, LoadOptions(expert_memory=64 * 1024))
    with pytest.raises(ExpertBlobError, match="expert 2 of layer 1"):
        lm.store.get(1, 2)
    path.write_bytes(bytes(data[: offset + 5]))  # truncated in the middle of expert 2
    with pytest.raises(ExpertBlobError, match=r"expert 2 of layer 1 .*truncated"):
        load(out)


def test_existing_out_refused_and_overwrite(tiny_mixtral, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    code, _, err = run_cli(capsys, "quantize", str(tiny_mixtral), str(out), "--recipe", "tiny-2bit")
    assert_one_line_error(code, err, "exists", "--overwrite")
    rec = tmp_path / "r.toml"
    rec.write_text(RECIPE.format(experts="int2-g16-hqq", attn="int4-g16-hqq"))
    code, out_text, _ = run_cli(
        capsys, "quantize", str(tiny_mixtral), str(out), "--recipe", str(rec), "--overwrite"
    )
    assert code == 0 and "int2-g16-hqq" in out_text
    assert (out / "moe_local.json").exists()


def test_interrupted_run_never_loads_and_resumes(tiny_mixtral, tmp_path):
    out = tmp_path / "q"
    recipe = _recipe(tmp_path)

    def boom(stage, done, total, nbytes):
        if stage == "layer 1":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(tiny_mixtral, out, recipe, progress=boom)
    assert not out.exists()
    partial = tmp_path / "q.partial"
    assert (partial / "progress" / "layer-0000.json").exists()
    with pytest.raises(MoeLocalError):  # not a model folder: no config.json, no manifest
        load(partial)
    with pytest.raises(MoeLocalError, match="--resume"):
        quantize_checkpoint(tiny_mixtral, out, recipe)
    seen = []
    quantize_checkpoint(tiny_mixtral, out, recipe, resume=True, progress=lambda s, *a: seen.append(s))
    assert "layer 0" not in seen and "layer 1" in seen
    fresh = tmp_path / "fresh"
    quantize_checkpoint(tiny_mixtral, fresh, recipe)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(load(out).model(ids).logits, load(fresh).model(ids).logits)


def test_dry_run_writes_nothing(tiny_mixtral, tmp_path):
    report = quantize_checkpoint(tiny_mixtral, tmp_path / "q", _recipe(tmp_path), dry_run=True)
    assert report.dry_run and report.bytes_out < report.bytes_in
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_group_size_steps_down_to_one_that_divides(tiny_mixtral, tmp_path):
    # v100-int8 asks for groups of 128; the tiny model is 32 wide (experts 64 wide in down)
    report = quantize_checkpoint(tiny_mixtral, tmp_path / "q", load_recipe("v100-int8"))
    manifest = json.loads((tmp_path / "q" / "moe_local.json").read_text())
    assert manifest["dense"]["model.layers.0.self_attn.q_proj.weight"] == "int8-g32"
    assert {"int8-g32", "int8-g64"} <= set(report.rows)
    assert "int8-g128" not in report.rows


def test_group_size_nothing_divides_keeps_the_tensor(tiny_checkpoint, tmp_path, capsys):
    # 40 is a multiple of none of 128/64/32/16: such tensors are kept (as llama.cpp does), never refused
    odd = tiny_checkpoint("mixtral", hidden_size=40)
    capsys.readouterr()  # (building it prints a progress bar)
    code, out, err = run_cli(capsys, "quantize", str(odd), str(tmp_path / "q"), "--recipe", "v100-int8")
    assert code == 0, err
    assert "keep (for int8-g128)" in out and "kept: no group size divides their width" in out
    manifest = json.loads((tmp_path / "q" / "moe_local.json").read_text())
    assert manifest["dense"]["model.layers.0.self_attn.q_proj.weight"] == "keep"
    assert manifest["layers"]["0"]["schemes"] == {"gate_up": "keep", "down": "int8-g64"}  # down is 64 wide
    ids = torch.arange(3, 13)[None]
    with torch.no_grad():
        a = load(odd).model(ids).logits
        b = load(tmp_path / "q", LoadOptions(dtype="float32")).model(ids).logits
    assert _cos(a, b) > 0.999


def test_recipe_errors(tmp_path):
    with pytest.raises(MoeLocalError, match="unknown recipe"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nmatch = "*"\nscheme = \n')
    with pytest.raises(MoeLocalError, match="line 3"):
        load_recipe(str(bad))
    bad.write_text('[[rule]]\nmatch = "*"\nscheme = "int5-g64"\n')
    with pytest.raises(MoeLocalError, match="rule 1"):
        load_recipe(str(bad))


def test_protected_tensors_stay_8bit_or_more():
    r = load_recipe("tiny-2bit")
    assert r.scheme_for("model.layers.0.mlp.experts.gate_up").bits == 2
    assert r.scheme_for("lm_head.weight") is None
    assert r.scheme_for("model.layers.0.mlp.shared_expert_gate.weight") is None
    for name in ("experts-4bit", "all-4bit", "mixtral-4090", "v100-int8", "tiny-2bit"):
        assert load_recipe(name).rules
    q4 = load_recipe("all-4bit")  # llama.cpp Q4_0's choices: 4-bit q/o, 8-bit k/v and lm_head
    assert q4.scheme_for("model.layers.3.self_attn.q_proj.weight").bits == 4
    assert q4.scheme_for("model.layers.3.self_attn.k_proj.weight").bits == 8
    assert q4.scheme_for("lm_head.weight").bits == 8
    assert q4.scheme_for("model.embed_tokens.weight") is None


def test_copy_keeps_source_untouched(tiny_mixtral, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_mixtral, src)
    before = sorted(p.name for p in src.iterdir())
    quantize_checkpoint(src, tmp_path / "q", _recipe(tmp_path))
    assert sorted(p.name for p in src.iterdir()) == before


@pytest.mark.parametrize(("method", "peer"), [("nf4", "int4-g64"), ("int8", "int8-g64")])
def test_bitsandbytes_methods(tiny_checkpoint, tmp_path, capsys, method, peer):
    pytest.importorskip("bitsandbytes")
    # rows at least one bitsandbytes block (64) wide: its CPU path is inexact on narrower rows
    src = tiny_checkpoint("mixtral", hidden_size=128, intermediate_size=128)
    (tmp_path / "r.toml").write_text(RECIPE.format(experts=peer, attn=peer))
    out = tmp_path / "q"
    args = ["quantize", str(src), str(out), "--recipe", str(tmp_path / "r.toml"), "--method", method]
    code, text, _ = run_cli(capsys, *args)
    assert code == 0 and method in text
    m = json.loads((out / "moe_local.json").read_text())
    assert m["layers"]["0"]["schemes"]["gate_up"] == method
    quantize_checkpoint(src, tmp_path / "peer", load_recipe(str(tmp_path / "r.toml")))
    ref, q, p = load(src), load(out), load(tmp_path / "peer")
    off = load(out, LoadOptions(expert_memory=q.store.get(0, 0).nbytes))
    ids = torch.arange(3, 23)[None]
    with torch.no_grad():
        a, b, c, d = ref.model(ids).logits, q.model(ids).logits, off.model(ids).logits, p.model(ids).logits
    # bitsandbytes at its width is about as close to the source as group-wise RTN at the same width
    assert _cos(a, b) > _cos(a, d) - 0.05
    assert torch.equal(b, c)


def test_unknown_method(capsys, tiny_mixtral, tmp_path):
    code, _, err = run_cli(capsys, "quantize", str(tiny_mixtral), str(tmp_path / "q"), "--method", "awq")
    assert_one_line_error(code, err, "unknown method")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v2"])
def test_dry_run_plan_matches_the_real_run(tiny_checkpoint, tmp_path, family):
    # the plan reads only headers; its per-scheme sizes must be what the real run writes
    src = tiny_checkpoint(family)
    recipe = load_recipe("experts-4bit")
    plan = quantize_checkpoint(src, tmp_path / "p", recipe, dry_run=True)
    real = quantize_checkpoint(src, tmp_path / "q", recipe)
    sizes = {k: (r.tensors, r.params, r.bytes_in, r.bytes_out) for k, r in plan.rows.items()}
    assert sizes == {k: (r.tensors, r.params, r.bytes_in, r.bytes_out) for k, r in real.rows.items()}
    assert plan.experts == real.experts


def test_dry_run_says_whether_it_fits_a_gpu(tiny_mixtral, tmp_path, capsys):
    from types import SimpleNamespace

    from moe_local.cli.tools import _fits_line

    code, out, err = run_cli(
        capsys, "quantize", str(tiny_mixtral), str(tmp_path / "q"), "--dry-run", "--gpu", "rtx4090"
    )
    assert code == 0, err
    assert "fits rtx4090 whole" in out and not (tmp_path / "q").exists()
    gib = 2**30
    big = SimpleNamespace(bytes_out=30 * gib, dense_bytes_out=2 * gib, experts=256)
    line = _fits_line(big, "rtx4090")  # 28 GiB of experts, 0.11 GiB each: about 196 fit beside the dense part
    assert "does not fit rtx4090 whole" in line and "about 196 of 256 experts" in line
    assert "dense part alone" in _fits_line(
        SimpleNamespace(bytes_out=40 * gib, dense_bytes_out=30 * gib, experts=8), "v100-16g"
    )
    code, _, err = run_cli(
        capsys, "quantize", str(tiny_mixtral), str(tmp_path / "q"), "--dry-run", "--gpu", "a100"
    )
    assert_one_line_error(code, err, "unknown --gpu")
