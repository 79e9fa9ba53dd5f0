"""``quantize`` with an ``mxfp4`` expert rule: GPT-OSS's MXFP4 experts kept byte for byte, floats too."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moe_local.config import LoadOptions, SamplingParams
from moe_local.convert.writer import quantize_checkpoint
from moe_local.generation import generate
from moe_local.loading.checkpoint import open_checkpoint
from moe_local.loading.loader import load
from moe_local.quant import Mxfp4Tensor, native, quantize_mxfp4
from moe_local.recipes import load_recipe
from tests.format.test_mxfp4 import write_mxfp4_checkpoint
from tests.helpers import run_cli

RECIPE = '[[rule]]\nmatch = "*.experts.*"\nscheme = "mxfp4"\n\n[[rule]]\nmatch = "*"\nscheme = "keep"\n'
GREEDY = SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.0)


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "experts-mxfp4.toml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def mxfp4_src(tiny_checkpoint, tmp_path_factory):
    return write_mxfp4_checkpoint(tiny_checkpoint("gpt_oss"), tmp_path_factory.mktemp("mx") / "gpt-oss")


@pytest.fixture(scope="module")
def kept(mxfp4_src, recipe_file, tmp_path_factory):
    """The MXFP4 checkpoint quantized with the mxfp4 expert rule (through the CLI's library call)."""
    out = tmp_path_factory.mktemp("kept") / "q"
    report = quantize_checkpoint(mxfp4_src, out, load_recipe(str(recipe_file)))
    return out, report


def test_stored_blocks_and_scales_are_the_sources_bytes(mxfp4_src, kept):
    out, report = kept
    source = load_file(mxfp4_src / "model.safetensors")
    manifest = json.loads((out / "moe_local.json").read_text())
    ckpt = open_checkpoint(out, dtype=torch.float32)
    for site in ckpt.sites:
        assert manifest["layers"][str(site.layer)]["schemes"] == {
            "gate_up": "mxfp4",
            "down": "mxfp4",
            "gate_up_bias": "keep",
            "down_bias": "keep",
        }
        for e in range(site.num_experts):
            w = ckpt.experts.read(site.layer, e)
            for part, key in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
                q = getattr(w, part)
                assert isinstance(q, Mxfp4Tensor)
                assert torch.equal(q.blocks, source[f"{site.name}.{key}_blocks"][e])
                assert torch.equal(q.scales, source[f"{site.name}.{key}_scales"][e])
    row = report.rows["mxfp4"]
    assert row.bytes_out * 8 / row.params == 4.25
    assert row.measured and row.rel_error_sum == 0.0  # no requantization: nothing lost


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("budget", [False, True])
def test_greedy_output_is_the_sources(mxfp4_src, kept, dtype, budget, monkeypatch):
    """On the exact path (float32, or bf16 without the native kernel): the source's output bit for bit."""
    if dtype == "bfloat16":
        monkeypatch.setattr(native, "available", lambda: False)
    out, _ = kept
    opts = LoadOptions(dtype=dtype)
    src = load(mxfp4_src, opts)
    if budget:  # offloaded: room for one expert, so experts are read from the blobs as they are routed
        opts = LoadOptions(
            dtype=dtype, expert_memory=max(src.store.get(s.layer, 0).nbytes for s in src.sites)
        )
    ours = load(out, opts)
    ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.model(ids).logits, src.model(ids).logits)
    prompt = src.tokenizer.encode("The quick brown fox")
    assert generate(ours, prompt, GREEDY).tokens == generate(src, prompt, GREEDY).tokens
    if budget:
        assert ours.store.stats().total.misses > 0


def test_cli_summary_says_mxfp4(mxfp4_src, recipe_file, tmp_path, capsys):
    code, out, err = run_cli(
        capsys, "quantize", str(mxfp4_src), str(tmp_path / "q"), "--recipe", str(recipe_file)
    )
    assert code == 0, err
    assert "mxfp4" in out and "4.25" in out


def test_a_float_source_is_quantized_to_mxfp4(tiny_checkpoint, recipe_file, tmp_path):
    src = tiny_checkpoint("gpt_oss")
    plan = quantize_checkpoint(src, tmp_path / "plan", load_recipe(str(recipe_file)), dry_run=True)
    assert plan.rows["mxfp4"].bytes_out * 8 / plan.rows["mxfp4"].params == 4.25
    out = tmp_path / "q"
    quantize_checkpoint(src, out, load_recipe(str(recipe_file)))
    ref = open_checkpoint(src, dtype=torch.float32, expert_dtype=None)
    ckpt = open_checkpoint(out, dtype=torch.float32)
    site = ckpt.sites[0]
    want = ref.experts.read(site.layer, 1).down
    got = ckpt.experts.read(site.layer, 1).down
    expected = quantize_mxfp4(want)
    assert torch.equal(got.blocks, expected.blocks) and torch.equal(got.scales, expected.scales)
    with torch.no_grad():
        ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(0))
        a = load(src, LoadOptions(dtype="float32")).model(ids).logits
        b = load(out, LoadOptions(dtype="float32")).model(ids).logits
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.95


def test_bf16_decode_runs_on_the_native_mxfp4_kernel(mxfp4_src, kept, monkeypatch):
    """A bf16 decode step reads the kept blocks with the native kernel (its error: test_mxfp4_scheme)."""
    if not native.available():
        pytest.skip("the native kernel is not built here")
    rows = []
    real = native.mxfp4_bf16
    monkeypatch.setattr(native, "mxfp4_bf16", lambda x2, *a: rows.append(x2.shape[0]) or real(x2, *a))
    out, _ = kept
    ours = load(out, LoadOptions(dtype="bfloat16"))
    prompt = ours.tokenizer.encode("The quick brown fox")
    assert len(generate(ours, prompt, SamplingParams(max_tokens=4, ignore_eos=True)).tokens) == 4
    assert rows and all(1 <= n <= 32 for n in rows)
