"""Bad input gets one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import assert_one_line_error, run_cli


@pytest.fixture
def copy_of(tiny_mixtral, tmp_path):
    def make():
        dst = tmp_path / "model"
        shutil.copytree(tiny_mixtral, dst)
        return dst

    return make


def test_folder_without_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", str(tmp_path), "hi")
    assert_one_line_error(code, err, "config.json")


def test_missing_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "no such model folder")


def test_unknown_model_type(capsys, copy_of):
    folder = copy_of()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "not_a_real_family"
    (folder / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "generate", str(folder), "hi")
    assert_one_line_error(code, err, "not_a_real_family")


def test_truncated_safetensors(capsys, copy_of):
    folder = copy_of()
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    code, _, err = run_cli(capsys, "generate", str(folder), "hi")
    assert_one_line_error(code, err, "truncated")


def test_corrupt_header(capsys, copy_of):
    folder = copy_of()
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"!" * 32
    f.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "inspect", str(folder))
    assert_one_line_error(code, err, "model.safetensors")


def test_missing_shard(capsys, copy_of):
    folder = copy_of()
    keys = ["model.embed_tokens.weight"]
    index = {"metadata": {}, "weight_map": {k: "model-00002-of-00002.safetensors" for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run_cli(capsys, "generate", str(folder), "hi")
    assert_one_line_error(code, err, "model-00002-of-00002.safetensors", "missing")


def test_missing_tokenizer(capsys, copy_of):
    folder = copy_of()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    code, _, err = run_cli(capsys, "generate", str(folder), "hi")
    assert_one_line_error(code, err, "tokenizer")


def test_prompt_longer_than_context(capsys, tiny_mixtral):
    code, _, err = run_cli(capsys, "generate", str(tiny_mixtral), "word " * 400, "--no-chat")
    assert_one_line_error(code, err, "prompt is", "context holds 256")


def test_pickle_only_checkpoint_refused(capsys, copy_of):
    folder = copy_of()
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    code, _, err = run_cli(capsys, "generate", str(folder), "hi")
    assert_one_line_error(code, err, "pickle")


def test_budget_smaller_than_one_expert(capsys, tiny_mixtral):
    code, _, err = run_cli(capsys, "generate", str(tiny_mixtral), "hi", "--expert-memory", "1KiB")
    assert_one_line_error(code, err, "smaller than one expert")


def test_bad_size(capsys, tiny_mixtral):
    code, _, err = run_cli(capsys, "generate", str(tiny_mixtral), "hi", "--expert-memory", "lots")
    assert_one_line_error(code, err, "memory size")


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"]])
def test_context_zero_refused(capsys, tiny_mixtral, command):
    code, _, err = run_cli(capsys, command[0], str(tiny_mixtral), *command[1:], "--context", "0")
    assert_one_line_error(code, err, "context must be >= 1", "not 0")


def test_expert_memory_beyond_this_machine_refused(capsys, tiny_mixtral):
    from moe_local.config import machine_memory
    from moe_local.units import human_bytes

    code, _, err = run_cli(capsys, "generate", str(tiny_mixtral), "hi", "--expert-memory", "999999999TiB")
    ram, _ = machine_memory()
    assert_one_line_error(code, err, "999999999.0 TiB", f"{human_bytes(ram)} of RAM")


def test_size_too_long_to_be_a_number(capsys, tiny_mixtral):
    code, _, err = run_cli(capsys, "generate", str(tiny_mixtral), "hi", "--expert-memory", "9" * 400 + "TiB")
    assert_one_line_error(code, err, "not a memory size", "too large")
    assert len(err) < 200


def test_load_options_refuse_what_cannot_load():
    import torch

    from moe_local.config import LoadOptions
    from moe_local.errors import MoeLocalError
    from moe_local.units import parse_size

    for bad, match in [
        (dict(context=0), "context must be >= 1"),
        (dict(context=-3), "context must be >= 1"),
        (dict(expert_memory=-1), "expert memory budget must be a size in bytes >= 0"),
        (dict(host_memory=1 << 80), "host memory budget .* more than this machine could hold"),
        (dict(device="tpu"), "unknown device 'tpu'"),
        (dict(device="cuda:99"), "device 'cuda:99' is not available"),
    ]:
        with pytest.raises(MoeLocalError, match=match):
            LoadOptions(**bad)
    if not torch.cuda.is_available():
        with pytest.raises(MoeLocalError, match="sees 0 CUDA devices"):
            LoadOptions(device="cuda")
    assert LoadOptions(context=1, expert_memory=0).context == 1
    with pytest.raises(MoeLocalError, match="cannot be negative"):
        parse_size(-5)
    with pytest.raises(MoeLocalError, match="not a memory size"):
        parse_size(True)
