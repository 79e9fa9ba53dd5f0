"""The pread-based safetensors reader agrees with the safetensors library."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from moe_local.errors import CheckpointError
from moe_local.format.safetensors_io import CheckpointFiles, SafetensorsFile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8])
def test_read_whole_and_slices(tmp_path, dtype):
    t = (torch.randn(4, 6, 5) * 10).to(dtype)
    save_file({"a": t, "b": torch.arange(7)}, tmp_path / "x.safetensors")
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert torch.equal(f.read("a"), t)
    assert torch.equal(f.read("b"), torch.arange(7))
    for i in range(4):
        assert torch.equal(f.read_slice("a", i, drop_cache=True), t[i])
    with pytest.raises(CheckpointError):
        f.read_slice("a", 4)


def test_truncated_file_is_refused(tmp_path):
    save_file({"a": torch.zeros(1000)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(tmp_path / "x.safetensors")


def test_sharded_index(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "s2.safetensors")
    index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = CheckpointFiles(tmp_path)
    assert sorted(files.names()) == ["a", "b"]
    assert torch.equal(files.read("b"), torch.zeros(3))
    index["weight_map"]["c"] = "s2.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not contain c"):
        CheckpointFiles(tmp_path)


def test_read_into_a_slice_of_a_buffer(tmp_path):
    a, b = torch.randn(3, 4).to(torch.bfloat16), torch.randn(5, 4).to(torch.bfloat16)
    save_file({"a": a, "b": b}, str(tmp_path / "model.safetensors"))
    files = CheckpointFiles(tmp_path)
    buf = torch.zeros(8, 4, dtype=torch.bfloat16)
    files.read("a", out=buf[:3])
    files.read("b", out=buf[3:])
    assert torch.equal(buf, torch.cat([a, b]))
    with pytest.raises(ValueError, match="cannot read"):
        files.read("a", out=torch.zeros(3, 4))  # wrong dtype


def _write_raw(path, entries: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file written byte by byte (for dtypes torch's writer does not emit)."""
    import json
    import struct

    header, data = {}, b""
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_dtypes_real_checkpoints_use(tmp_path):
    # U32 (GPTQ qweight), F8_E8M0 (MXFP4 scales), U16/U64: all read, none "malformed"
    path = tmp_path / "m.safetensors"
    _write_raw(
        path,
        {
            "q": ("U32", [2], (7).to_bytes(4, "little") + (2**32 - 1).to_bytes(4, "little")),
            "s": ("F8_E8M0", [2], bytes([127, 128])),  # 2^0 and 2^1
            "h": ("U16", [1], (65535).to_bytes(2, "little")),
            "w": ("U64", [1], (2**40).to_bytes(8, "little")),
        },
    )
    f = SafetensorsFile(path)
    assert f.read("q").to(torch.int64).tolist() == [7, 2**32 - 1]
    assert f.read("s").float().tolist() == [1.0, 2.0]
    assert f.read("h").to(torch.int64).tolist() == [65535]
    assert f.read("w").to(torch.int64).tolist() == [2**40]


def test_sub_byte_dtype_is_named_not_malformed(tmp_path):
    path = tmp_path / "m.safetensors"
    _write_raw(path, {"x": ("F4", [4], b"\x00\x00")})
    with pytest.raises(CheckpointError, match="stored as F4"):
        SafetensorsFile(path)


def test_negative_offsets_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    _write_raw(path, {"x": ("U8", [4], b"abcd")})
    raw = bytearray(path.read_bytes())
    text = raw.replace(b'"data_offsets": [0, 4]', b'"data_offsets":[-4,0] ')
    path.write_bytes(bytes(text))
    with pytest.raises(CheckpointError, match="negative"):
        SafetensorsFile(path)
