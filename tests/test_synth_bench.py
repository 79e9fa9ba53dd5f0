"""synth writes the dimensions and sizes asked for; bench --json reports every field sanely."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_local.config import LoadOptions, SamplingParams
from moe_local.generation import generate
from moe_local.inspection import inspect_model
from moe_local.loading.loader import load
from moe_local.synth import LIKE, synth, synth_config
from moe_local.tiny import tiny_config
from tests.helpers import assert_one_line_error, run_cli

RECIPE = (
    '[[rule]]\nmatch = "*.experts.*"\nscheme = "int4-g16"\n'
    '[[rule]]\nmatch = "*.self_attn.*"\nscheme = "int8-g16"\n'
)


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    return path


def test_known_configs_have_real_dimensions():
    mix = synth_config("mixtral-8x7b")
    assert (mix.hidden_size, mix.intermediate_size, mix.num_hidden_layers, mix.num_local_experts) == (
        4096, 14336, 32, 8)  # fmt: skip
    assert synth_config("qwen3-30b-a3b", layers=2).num_hidden_layers == 2
    assert set(LIKE) == {"mixtral-8x7b", "mixtral-8x22b", "qwen3-30b-a3b", "deepseek-v2-lite", "gpt-oss-20b"}


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_synth_moe_local_sizes(tmp_path, recipe_file, family):
    cfg = tmp_path / "cfg"
    tiny_config(family).save_pretrained(cfg)
    out = run_synth(tmp_path, cfg, recipe_file, "moe-local")
    m = json.loads((out / "moe_local.json").read_text())
    info = inspect_model(out)
    assert info.family == family and info.quantized
    for layer in m["layers"].values():
        h = layer["shapes"]["down"][0]
        i = layer["shapes"]["down"][1]
        assert layer["shapes"]["gate_up"] == [2 * i, h]
        # int4 codes + fp16 scale and zero per group of 16, for gate_up and down
        want = 3 * h * i // 2 + 2 * 2 * (2 * i * h // 16 + h * i // 16)
        biases = sum(2 * n for p, (n,) in ((p, s) for p, s in layer["shapes"].items() if len(s) == 1))
        assert layer["experts"][0][1] >= want + biases
    lm = load(out)
    assert len(generate(lm, [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True)).tokens) == 3


def run_synth(tmp_path, cfg, recipe_file, fmt):
    from moe_local.recipes import load_recipe

    return synth(str(cfg / "config.json"), tmp_path / fmt, fmt=fmt, recipe=load_recipe(str(recipe_file)))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_synth_hf_loads_in_transformers(tmp_path, recipe_file, family):
    cfg = tmp_path / "cfg"
    tiny_config(family).save_pretrained(cfg)
    out = run_synth(tmp_path, cfg, recipe_file, "hf")
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = load(out, LoadOptions(dtype="float32"))
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        a, b = ref(ids).logits, ours.model(ids).logits
    assert float((a - b).abs().max() / a.abs().max()) < 1e-4  # every tensor was found under its disk name


def test_synth_cli_refuses_existing_and_unknown(capsys, tmp_path):
    (tmp_path / "o").mkdir()
    code, _, err = run_cli(capsys, "synth", str(tmp_path / "o"), "--like", "mixtral-8x7b", "--layers", "1")
    assert_one_line_error(code, err, "exists")
    code, _, err = run_cli(capsys, "synth", str(tmp_path / "x"), "--like", "llama-moe-9000")
    assert_one_line_error(code, err, "unknown --like")


def test_bench_json_reports_every_field(capsys, tiny_mixtral, tmp_path):
    out = tmp_path / "b.json"
    args = [
        "bench",
        str(tiny_mixtral),
        "--prompt-tokens",
        "32",
        "--new-tokens",
        "8",
        "--expert-memory",
        "30KiB",
    ]
    code, text, _ = run_cli(capsys, *args, "--json", str(out))
    assert code == 0 and "decode" in text and "floor" in text
    r = json.loads(out.read_text())
    assert r["prompt_tokens"] == 32 and r["new_tokens"] == 8
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["time_to_first_token_s"] > 0
    assert 0 <= r["expert_hit_rate"] < 1  # one slot: some misses
    assert r["bytes_from_disk_per_token"] > 0 and r["io_wait_s_per_token"] >= 0
    assert r["peak_rss_bytes"] > 50 * 2**20 and r["disk_bandwidth"] > 0
    assert r["floor_s_per_token"] > 0 and r["ratio_to_floor"] > 0 and r["resident_s_per_token"] > 0
    assert r["expert_memory"] == 30 * 1024


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"model_type": "mixtral", "num_local_experts": 1000000000}', "num_local_experts = 1000000000"),
        ('{"model_type": "mixtral", "num_experts_per_tok": 9, "num_local_experts": 8}', "larger than"),
        ('{"hidden_size": 8}', "no model_type"),
        ("not json at all", "not a JSON config file"),
        ('{"model_type": "no-such-family"}', "not a valid 'no-such-family' config"),
    ],
)
def test_synth_like_a_bad_config_file_is_one_line(tmp_path, capsys, content, needle):
    like = tmp_path / "cfg" / "config.json"
    like.parent.mkdir()
    like.write_text(content)
    code, _, err = run_cli(capsys, "synth", str(tmp_path / "out"), "--like", str(like))
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cap", ["cgroup", "cpu_memory"])
def test_bench_floor_without_a_second_copy_when_it_would_not_fit(tiny_mixtral, monkeypatch, cap):
    import moe_local.bench as bench_mod
    import moe_local.loading.loader as loader
    from moe_local.memory import process_rss

    loads = []
    real_load = loader.load

    def counting_load(*args, **kwargs):
        loads.append(args[1].expert_memory if len(args) > 1 else kwargs.get("options"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(loader, "load", counting_load)
    cpu_memory = None
    if cap == "cgroup":  # a cgroup with nothing left: the all-resident copy would be killed
        monkeypatch.setattr(bench_mod, "available_memory", lambda: 0)
    else:
        cpu_memory = process_rss()  # --cpu-memory at what the process holds already
    options = LoadOptions(expert_memory=30 * 1024)
    r = bench_mod.bench(tiny_mixtral, options, prompt_tokens=16, new_tokens=4, cpu_memory=cpu_memory)
    assert loads == [30 * 1024]  # one load, the budgeted one
    assert not r.resident_measured and r.resident_s_per_token > 0 and r.floor_s_per_token > 0
    assert "estimated" in bench_mod.format_table(r)
    roomy = bench_mod.bench(tiny_mixtral, options, prompt_tokens=16, new_tokens=4, cpu_memory=8 * 2**30)
    assert roomy.resident_measured == (cap == "cpu_memory") and len(loads) == (2 if cap == "cgroup" else 3)
