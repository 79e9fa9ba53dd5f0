"""Inputs a user can get wrong that used to surface as "error: unexpected ..." now get one clear line."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import assert_one_line_error, run_cli


@pytest.fixture
def model(tiny_mixtral, tmp_path) -> Path:
    copy = tmp_path / "m"
    shutil.copytree(tiny_mixtral, copy)
    return copy


def _rewrite(model: Path, edit) -> None:
    shard = next(model.glob("*.safetensors"))
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)


def _no_unexpected(code, err, *needles):
    assert "unexpected" not in err, err
    assert_one_line_error(code, err, *needles)


def test_a_missing_expert_tensor_is_named(model, capsys):
    _rewrite(model, lambda t: t.pop(next(k for k in t if ".experts.1.w1" in k)))
    code, _, err = run_cli(capsys, "generate", str(model), "hi", "-n", "2", "--no-chat")
    _no_unexpected(code, err, "lacks the gate tensor of expert 1")


def test_an_expert_tensor_of_another_shape_is_named(model, capsys):
    def shrink(t):
        key = next(k for k in t if ".experts.2.w1" in k)
        t[key] = t[key][:8].clone()

    _rewrite(model, shrink)
    code, _, err = run_cli(capsys, "generate", str(model), "hi", "-n", "2", "--no-chat")
    _no_unexpected(code, err, "experts.2.w1", "shape")


def test_an_integer_dense_weight_is_refused(model, capsys):
    _rewrite(model, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))
    code, _, err = run_cli(capsys, "generate", str(model), "hi", "-n", "2", "--no-chat")
    _no_unexpected(code, err, "model.norm.weight", "floating point")


def test_a_header_that_is_not_a_table(model, capsys):
    shard = next(model.glob("*.safetensors"))
    header = b"[1,2,3]"
    shard.write_bytes(struct.pack("<Q", len(header)) + header + bytes(1 << 20))  # big enough for the config
    code, _, err = run_cli(capsys, "inspect", str(model))
    _no_unexpected(code, err, "corrupt safetensors header")


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", None])
def test_a_manifest_that_is_not_text_or_is_a_folder(tiny_mixtral, tmp_path, capsys, content):
    from moe_local.convert.writer import quantize_checkpoint
    from moe_local.recipes import load_recipe

    out = tmp_path / "q"
    quantize_checkpoint(tiny_mixtral, out, load_recipe("tiny-2bit"))
    manifest = out / "moe_local.json"
    if content is None:
        manifest.unlink()
        manifest.mkdir()
    else:
        manifest.write_bytes(content)
    code, _, err = run_cli(capsys, "inspect", str(out))
    _no_unexpected(code, err, "moe_local.json")


def test_trace_and_json_paths_are_checked_before_the_work(tiny_mixtral, tmp_path, capsys, monkeypatch):
    import moe_local.loading.loader as loader

    monkeypatch.setattr(loader, "load", lambda *a, **k: pytest.fail("loaded before the path was checked"))
    for flag, cmd in (
        ("--trace", ["generate", str(tiny_mixtral), "hi"]),
        ("--json", ["bench", str(tiny_mixtral)]),
    ):
        for bad in (str(tmp_path), str(tmp_path / "no" / "such" / "x"), "/proc/x.json"):
            code, _, err = run_cli(capsys, *cmd, flag, bad)
            _no_unexpected(code, err, flag)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["generate", "~no-such-user-x/m", "hi"], "cannot expand"),
        (["generate", "{m}", "hi", "--no-chat", "--seed", str(2**70)], "seed must fit in 64 bits"),
        (["bench", "{m}", "--prompt-tokens", "-1"], "--prompt-tokens"),
        (["synth", "", "--like", "mixtral-8x7b"], "names no folder"),
        (["quantize", "{m}", "{tmp}/" + "x" * 300], "File name too long"),
        (["quantize", "{m}", "{tmp}/q", "--recipe", "{tmp}/bad.toml"], "not a UTF-8 text file"),
        (["trace", "{tmp}/t.jsonl"], "not a trace record"),
    ],
)
def test_bad_values_are_one_line(tiny_mixtral, tmp_path, capsys, args, needle):
    (tmp_path / "bad.toml").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "t.jsonl").write_text(json.dumps({"layer": 0, "experts": [1]})[:-2] + "1e400]}\n")
    argv = [a.format(m=tiny_mixtral, tmp=tmp_path) for a in args]
    code, _, err = run_cli(capsys, *argv)
    _no_unexpected(code, err, needle)


def test_gptq_with_one_group_per_row_writes(tiny_checkpoint, tmp_path):
    # a [O, 1] scale tensor with strides (1, O) is "contiguous" but could not be viewed as bytes
    from moe_local.format.blob import layout_of, pack_blob

    t = torch.randn(1, 6).t()  # [6, 1], strides (1, 6)
    slots, length = layout_of({"s": t})
    blob = pack_blob({"s": t}, slots, length)
    assert torch.equal(torch.frombuffer(bytearray(blob[: t.numel() * 4]), dtype=torch.float32), t.reshape(-1))


def test_policy_and_max_tokens_are_checked(tiny_mixtral, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", str(tiny_mixtral), "hi", "--policy", "bogus")
    _no_unexpected(code, err, "unknown cache policy 'bogus'")
    text = tmp_path / "t.txt"
    text.write_text("some words to score here\n")
    code, _, err = run_cli(capsys, "eval", str(tiny_mixtral), "--text", str(text), "--max-tokens", "-1")
    _no_unexpected(code, err, "--max-tokens must be at least 2")


def test_an_unwritable_home_for_the_demo_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("MOE_LOCAL_HOME", "/proc/moe-local-home")
    code, _, err = run_cli(capsys, "demo", "--layers", "1")
    lines = [ln for ln in err.splitlines() if ln.strip()]  # a notice that the build starts, then the error
    assert code != 0 and "unexpected" not in err and "Traceback" not in err
    assert lines[-1].startswith("error: cannot build the demo in /proc/moe-local-home"), err
