"""A checkpoint's own metadata cannot make moe-local read outside it, allocate absurd sizes,
load corrupt dense bytes, or resume into a folder that mixes two runs."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from moe_local.convert.writer import quantize_checkpoint
from moe_local.errors import CheckpointError, ExpertBlobError, MoeLocalError
from moe_local.format.safetensors_io import SafetensorsFile
from moe_local.loading.loader import load
from moe_local.recipes import load_recipe
from tests.helpers import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def quantized(tiny_mixtral, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("read-safety") / "q"
    quantize_checkpoint(tiny_mixtral, out, load_recipe("tiny-2bit"))
    return out


@pytest.fixture
def folder(quantized, tmp_path) -> Path:
    """A private copy of the quantized folder, free to damage."""
    copy = tmp_path / "q"
    shutil.copytree(quantized, copy)
    return copy


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / "moe_local.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("name", ["/dev/zero", "../outside.bin", "experts/../../outside.bin"])
def test_blob_file_outside_the_folder_is_refused(folder, capsys, name):
    (folder.parent / "outside.bin").write_bytes(b"\0" * (1 << 20))

    def point(m):
        m["layers"]["0"]["file"] = name

    _edit_manifest(folder, point)
    code, _, err = run_cli(capsys, "generate", str(folder), "hi", "-n", "2", "--no-chat")
    assert_one_line_error(code, err, repr(name))
    assert "outside" in err or "not a file name" in err


def test_symlink_leading_outside_is_refused(folder, tmp_path):
    blob = folder / "experts" / "layer-0000.bin"
    real = tmp_path / "elsewhere.bin"
    shutil.move(blob, real)
    os.symlink(real, blob)
    with pytest.raises(CheckpointError, match="leads outside"):
        load(folder)
    os.remove(blob)
    os.symlink(os.path.relpath(real, blob.parent), blob)  # relative links are resolved too
    with pytest.raises(CheckpointError, match="leads outside"):
        load(folder)


def test_a_link_inside_the_folder_is_fine(folder):
    blob = folder / "experts" / "layer-0000.bin"
    shutil.move(blob, folder / "moved.bin")
    os.symlink("../moved.bin", blob)
    load(folder)


def test_absurd_expert_length_is_refused_before_allocating(folder):
    def huge(m):
        m["layers"]["1"]["experts"][3][1] = 10**12

    _edit_manifest(folder, huge)
    t0 = time.perf_counter()
    with pytest.raises(ExpertBlobError, match=r"expert 3 of layer 1.*truncated or the manifest is corrupt"):
        load(folder)
    assert time.perf_counter() - t0 < 30  # it fails on the check, not after a 1 TB allocation


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m["layers"]["0"]["schemes"].update(up="int9-g7"), "unknown scheme 'int9-g7'"),
        (lambda m: m["layers"]["0"]["experts"][1].__setitem__(1, -5), "expected [offset, length, crc32]"),
        (lambda m: m["layers"]["0"].update(slots="nope"), "malformed"),
        (lambda m: m["layers"]["0"]["slots"][0].update(dtype="Q7"), "malformed slot"),
        (lambda m: m["layers"]["0"]["slots"][0].update(offset=10**9), "lies outside expert 0"),
        (lambda m: m.update(layers=[1, 2]), "'layers' must map"),
        (lambda m: m.update(dense={"x": 3}), "'dense' must map"),
        (
            lambda m: m["dense"].update({"model.layers.0.self_attn.q_proj.weight": "int3-g5"}),
            "unknown scheme 'int3-g5'",
        ),
        (lambda m: m["dense"].update({"model.norm.weight": "int4-g16"}), "not a linear weight"),
        (lambda m: m["layers"]["1"].update(experts=[]), "'experts' must list"),
        (lambda m: m.update(dense_crc32=None), "dense_crc32"),
    ],
)
def test_malformed_manifest_is_one_line(folder, capsys, edit, needle):
    _edit_manifest(folder, edit)
    code, _, err = run_cli(capsys, "generate", str(folder), "hi", "-n", "2", "--no-chat")
    assert_one_line_error(code, err, needle)
    assert "unexpected" not in err


def test_flipped_dense_byte_is_caught(folder, capsys):
    dense = folder / "dense.safetensors"
    info = SafetensorsFile(dense).tensors["model.norm.weight"]
    data = bytearray(dense.read_bytes())
    data[info.offset + 1] ^= 0x01
    dense.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "generate", str(folder), "hi", "-n", "2", "--no-chat")
    assert_one_line_error(code, err, "model.norm.weight", "checksum")


def test_dense_checksums_cover_every_tensor(quantized):
    m = json.loads((quantized / "moe_local.json").read_text())
    assert set(m["dense_crc32"]) == set(SafetensorsFile(quantized / "dense.safetensors").tensors)


def test_index_naming_a_file_outside_is_refused(tiny_mixtral, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(tiny_mixtral, src)
    shard = next(src.glob("*.safetensors"))
    shutil.move(shard, tmp_path / "stolen.safetensors")
    with open(tmp_path / "stolen.safetensors", "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        keys = [k for k in json.loads(f.read(header_len)) if k != "__metadata__"]
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, "../stolen.safetensors")}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="leads outside"):
        load(src)
    index["weight_map"] = dict.fromkeys(keys, str(tmp_path / "stolen.safetensors"))
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file name inside"):
        load(src)


def test_hub_cache_links_into_blobs_are_allowed(tiny_mixtral, tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in tiny_mixtral.iterdir():
        blob = repo / "blobs" / f.name
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    load(snap)


def _interrupt_after_layer_0(src, out, recipe):
    def boom(stage, *a):
        if stage == "layer 1":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, out, recipe, progress=boom)


def test_resume_with_another_recipe_or_source_is_refused(tiny_mixtral, tmp_path, capsys):
    out = tmp_path / "q"
    _interrupt_after_layer_0(tiny_mixtral, out, load_recipe("tiny-2bit"))
    code, _, err = run_cli(
        capsys, "quantize", str(tiny_mixtral), str(out), "--recipe", "experts-4bit", "--resume"
    )
    assert_one_line_error(code, err, "cannot resume", "different recipe")
    code, _, err = run_cli(
        capsys,
        "quantize",
        str(tiny_mixtral),
        str(out),
        "--recipe",
        "tiny-2bit",
        "--method",
        "rtn",
        "--resume",
    )
    assert_one_line_error(code, err, "different recipe or --method")
    other = tmp_path / "finetune"  # same names, shapes and config; other weights
    shutil.copytree(tiny_mixtral, other)
    shard = next(other.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    for i in range(len(data) - 4096, len(data)):
        data[i] ^= 0x55
    shard.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "quantize", str(other), str(out), "--recipe", "tiny-2bit", "--resume")
    assert_one_line_error(code, err, "cannot resume", "different SRC")
    assert not out.exists()
    moved = tmp_path / "moved-source"  # the same checkpoint in another place is the same source
    shutil.copytree(tiny_mixtral, moved)
    code, _, err = run_cli(capsys, "quantize", str(moved), str(out), "--recipe", "tiny-2bit", "--resume")
    assert code == 0, err
    m = json.loads((out / "moe_local.json").read_text())
    assert m["run"]["recipe"]["name"] == "tiny-2bit" and not (out / "progress").exists()
    load(out)


def test_resume_of_a_folder_without_a_run_record_is_refused(tiny_mixtral, tmp_path):
    out = tmp_path / "q"
    _interrupt_after_layer_0(tiny_mixtral, out, load_recipe("tiny-2bit"))
    (tmp_path / "q.partial" / "progress" / "run.json").unlink()
    with pytest.raises(MoeLocalError, match="does not record what it was started with"):
        quantize_checkpoint(tiny_mixtral, out, load_recipe("tiny-2bit"), resume=True)
