"""moe-local never runs Python code from a model folder, and never asks whether it may.

Each folder here carries an ``auto_map`` whose .py files would write a marker file if executed;
the CLI gets "y" on stdin, the answer transformers' "run the custom code? [y/N]" prompt takes.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from moe_local.errors import UnsupportedModelError
from moe_local.loading.meta import build_on_meta
from moe_local.loading.validate import REMOTE_CODE, TOKENIZER_REMOTE_CODE
from tests.helpers import assert_one_line_error, run_cli


def _booby_trap(folder: Path, module: str, marker: Path) -> None:
    """A module that records being imported, and would then offer the class auto_map names."""
    (folder / f"{module}.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('the folder code ran')\n"
        "from transformers import PretrainedConfig, PreTrainedTokenizerFast\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_moe'\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )


def _edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


@pytest.fixture
def custom_family(tiny_mixtral, tmp_path):
    """A folder whose family exists only in its own code: model_type unknown, auto_map to .py files."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_mixtral, folder)
    marker = tmp_path / "marker"
    _booby_trap(folder, "configuration_evil", marker)
    _booby_trap(folder, "modeling_evil", marker)
    auto_map = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    _edit_json(folder / "config.json", model_type="evil_moe", auto_map=auto_map)
    return folder, marker


def test_cli_refuses_custom_code_even_answering_yes(custom_family):
    folder, marker = custom_family
    r = subprocess.run(
        [sys.executable, "-m", "moe_local", "inspect", str(folder)],
        input="y\ny\ny\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert not marker.exists(), "code from the model folder ran"
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"error: {REMOTE_CODE}"], r.stderr
    assert "[y/N]" not in r.stdout + r.stderr


@pytest.mark.parametrize("command", ["inspect", "generate", "plan"])
def test_every_command_refuses_custom_code(capsys, monkeypatch, custom_family, command):
    folder, marker = custom_family
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 8))  # what the prompt would read
    args = [command, str(folder)] + (["hi", "-n", "2"] if command == "generate" else [])
    code, out, err = run_cli(capsys, *args)
    assert not marker.exists(), "code from the model folder ran"
    assert_one_line_error(code, err, REMOTE_CODE)
    assert "[y/N]" not in out + err


def test_known_family_with_auto_map_uses_builtin_class(capsys, monkeypatch, tiny_checkpoint, tmp_path):
    """DeepSeek-V3 checkpoints on the hub carry an auto_map: transformers' own class must load them."""
    folder = tmp_path / "deepseek"
    shutil.copytree(tiny_checkpoint("deepseek_v3"), folder)
    marker = tmp_path / "marker"
    for module in ("configuration_deepseek", "modeling_deepseek"):
        _booby_trap(folder, module, marker)
    auto_map = {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    }
    _edit_json(folder / "config.json", auto_map=auto_map)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 8))
    code, out, err = run_cli(capsys, "generate", str(folder), "hi", "-n", "3", "--no-chat")
    assert code == 0, err
    assert not marker.exists()
    code, out, _ = run_cli(capsys, "inspect", str(folder))
    assert code == 0 and "DeepseekV3ForCausalLM" in out


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_tokenizer_auto_map_never_runs(capsys, monkeypatch, tiny_checkpoint, tmp_path, family):
    """deepseek_v3 has no built-in tokenizer mapping: refused in one line; mixtral's built-in one loads."""
    folder = tmp_path / "tok"
    shutil.copytree(tiny_checkpoint(family), folder)
    marker = tmp_path / "marker"
    _booby_trap(folder, "tokenization_evil", marker)
    _edit_json(
        folder / "tokenizer_config.json",
        auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
        tokenizer_class="EvilTokenizer",
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 8))
    code, _, err = run_cli(capsys, "generate", str(folder), "hi", "-n", "2", "--no-chat")
    assert not marker.exists(), "tokenizer code from the model folder ran"
    assert "[y/N]" not in err
    if family == "deepseek_v3":
        assert_one_line_error(code, err, TOKENIZER_REMOTE_CODE)
    else:
        assert code == 0, err


def test_model_class_only_in_auto_map_is_refused():
    """A config transformers knows but whose causal LM exists only in the folder's code."""
    config = AutoConfig.for_model("vit")
    with pytest.raises(UnsupportedModelError, match="not supported: transformers has no causal-LM class"):
        build_on_meta(config, torch.float32)
    config.auto_map = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    with pytest.raises(UnsupportedModelError) as info:
        build_on_meta(config, torch.float32)
    assert str(info.value) == REMOTE_CODE
