"""``--offload-dir``: experts staged once as one-read blobs on another disk, same logits."""

from __future__ import annotations

import json

import torch

from moe_local.config import LoadOptions
from moe_local.convert.staging import prepare, staged_path
from moe_local.convert.writer import quantize_checkpoint
from moe_local.loading.loader import load
from moe_local.recipes import load_recipe
from tests.helpers import run_cli

IDS = torch.arange(3, 19)[None]


def _logits(path, offload_dir=None, **options):
    path = prepare(path, offload_dir)  # the step a command runs before load with --offload-dir
    with torch.no_grad():
        return load(path, LoadOptions(dtype="float32", **options)).model(IDS).logits


def test_hf_checkpoint_is_staged_as_blobs_with_equal_logits(tiny_mixtral, tmp_path):
    offload = tmp_path / "nvme"
    direct = _logits(tiny_mixtral, expert_memory=1 << 16)
    staged = _logits(tiny_mixtral, expert_memory=1 << 16, offload_dir=str(offload))
    assert torch.equal(direct, staged)
    folder = staged_path(tiny_mixtral, offload)
    manifest = json.loads((folder / "moe_local.json").read_text())
    assert set(manifest["layers"]["0"]["schemes"].values()) == {"keep"}  # nothing quantized
    assert list(folder.glob("experts/layer-*.bin"))
    stamp = folder.stat().st_mtime_ns
    _logits(tiny_mixtral, offload_dir=str(offload))  # second load reuses the staged copy
    assert folder.stat().st_mtime_ns == stamp and len(list(offload.iterdir())) == 1


def test_moe_local_folder_is_copied(tiny_mixtral, tmp_path):
    q = tmp_path / "q"
    quantize_checkpoint(tiny_mixtral, q, load_recipe("experts-4bit"))
    staged = _logits(q, offload_dir=str(tmp_path / "nvme"))
    assert torch.equal(_logits(q), staged)
    assert (staged_path(q, tmp_path / "nvme") / "experts").is_dir()


def test_cli_flag_and_unusable_dir(tiny_mixtral, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "generate", str(tiny_mixtral), "Hi", "-n", "2", "--offload-dir", str(tmp_path / "o")
    )
    assert code == 0, err
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "generate", str(tiny_mixtral), "Hi", "--offload-dir", str(blocker / "x"))
    assert code != 0 and "offload-dir" in err and "Traceback" not in err
