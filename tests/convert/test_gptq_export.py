"""GPTQ export and reader: tensor names, moe-local's load, GPTQModel's load of the export."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from moe_local.config import LoadOptions
from moe_local.convert.gptq_export import export_gptq, gptq_tensors, rtn_int_zero
from moe_local.errors import MoeLocalError, UnsupportedModelError
from moe_local.format.gptq_layout import (
    gptq_to_quantized,
    is_gptq_checkpoint,
    pack_cols,
    pack_rows,
    qzeros_from_checkpoint,
    qzeros_to_v1,
)
from moe_local.format.gptq_reader import GptqExperts
from moe_local.format.safetensors_io import CheckpointFiles
from moe_local.loading.loader import load, load_gptq
from moe_local.quant import QuantizedTensor

IDS = torch.randint(0, 250, (1, 20), generator=torch.Generator().manual_seed(0))
ROOT = Path(__file__).resolve().parents[2]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """Factory: ``exported(family, bits) -> GPTQ folder`` (group size 16), cached for the module."""
    made: dict[tuple[str, int], Path] = {}

    def make(family: str, bits: int = 4) -> Path:
        if (family, bits) not in made:
            out = tmp_path_factory.mktemp(f"gptq-{family}-{bits}") / "out"
            made[(family, bits)] = export_gptq(tiny_checkpoint(family), out, bits, 16)
        return made[(family, bits)]

    return make


def _logits(lm) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(IDS).logits


def _dequant_int_zero(w: torch.Tensor, bits: int, group_size: int = 16) -> torch.Tensor:
    codes, scales, zeros = rtn_int_zero(w, bits, group_size)
    o, i = w.shape
    groups = codes.view(o, -1, group_size).float() - zeros.float()[..., None]
    return (groups * scales.float()[..., None]).view(o, i)


def _int_zero_reference(src: Path, bits: int):
    """The fp32 source with every exported weight replaced by its RTN int-zero reconstruction."""
    from moe_local.convert.gptq_export import _quantizable_linears

    ref = load(src)
    for name in _quantizable_linears(ref.model):
        m = ref.model.get_submodule(name)
        m.weight.data = _dequant_int_zero(m.weight.data, bits)
    for site in ref.sites:
        for e in range(site.num_experts):
            w = ref.store.get(site.layer, e)
            half = w.gate_up.shape[0] // 2
            parts = (w.gate_up[:half], w.gate_up[half:])
            w.gate_up = torch.cat([_dequant_int_zero(p, bits) for p in parts])
            w.down = _dequant_int_zero(w.down, bits)
    return ref


# ----------------------------------------------------------------------------- bit layout


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_int_zero_bounds(bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    w[0, :16] = w[0, :16].abs() + 0.5  # a group of positive weights
    w[1, :16] = -w[1, :16].abs() - 0.5  # a group of negative weights
    w[2, :16] = 0.0
    codes, scales, zeros = rtn_int_zero(w, bits, 16)
    qmax = (1 << bits) - 1
    assert codes.dtype == torch.uint8 and int(codes.max()) <= qmax
    assert scales.dtype == torch.float16 and bool((scales > 0).all())
    assert int(zeros.min()) >= 1 and int(zeros.max()) <= qmax
    w_hat = _dequant_int_zero(w, bits)
    err = (w - w_hat).abs().view(32, 4, 16)
    assert bool((err <= scales.float()[..., None] * 0.51).all())  # round-off only: nothing clipped
    assert torch.equal(w_hat[2, :16], torch.zeros(16))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_tensors_read_back_as_the_same_weight(bits):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    t = gptq_tensors(w, bits, 32)
    assert t["qweight"].shape == (128 * bits // 32, 64) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (4, 64 * bits // 32) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (4, 64) and t["scales"].dtype == torch.float16
    assert torch.equal(t["g_idx"], torch.arange(128, dtype=torch.int32) // 32)
    qt = gptq_to_quantized(t, bits, 1, "w")
    assert isinstance(qt, QuantizedTensor) and qt.qtype.bits == bits and qt.qtype.group_size == 32
    assert torch.equal(qt.dequantize(), _dequant_int_zero(w, bits, 32))


def test_per_channel_and_large_groups_map_exactly():
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(3))
    for gs in (512, 256):  # 512 over 512 inputs: per-channel, as group_size -1 checkpoints hold it
        codes, scales, zeros = rtn_int_zero(w, 4, gs)
        t = {
            "qweight": pack_rows(codes.t(), 4),
            "qzeros": qzeros_to_v1(zeros.t(), 4),
            "scales": scales.t().contiguous(),
            "g_idx": torch.arange(512, dtype=torch.int32) // gs,
        }
        qt = gptq_to_quantized(t, 4, 1, "w")
        assert qt.qtype.group_size == 128
        assert torch.equal(qt.dequantize(), _dequant_int_zero(w, 4, gs))


def test_act_order_is_refused():
    t = gptq_tensors(torch.randn(16, 64), 4, 16)
    t["g_idx"] = t["g_idx"][torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(UnsupportedModelError, match="act-order"):
        gptq_to_quantized(t, 4, 1, "w")


# ----------------------------------------------------------------------------- export layout


@pytest.mark.parametrize(
    ("family", "expert_proj"),
    [("mixtral", "block_sparse_moe.experts.3.w1"), ("qwen2_moe", "mlp.experts.3.gate_proj")],
)
def test_export_layout(exported, tiny_checkpoint, family, expert_proj):
    out = exported(family)
    assert is_gptq_checkpoint(out) and not is_gptq_checkpoint(tiny_checkpoint(family))
    assert not out.with_name("out.partial").exists()
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "gptq" and q["checkpoint_format"] == "gptq"
    assert (q["bits"], q["group_size"], q["pack_dtype"]) == (4, 16, "int32")
    assert q["desc_act"] is False and q["sym"] is False
    assert json.loads((out / "quantize_config.json").read_text()) == q
    for f in ("tokenizer.json", "generation_config.json", "model.safetensors.index.json"):
        assert (out / f).exists()
    files, src = CheckpointFiles(out), CheckpointFiles(tiny_checkpoint(family))
    hidden = 32
    inter = src.info(f"model.layers.0.{expert_proj}.weight").shape[0]
    prefix = f"model.layers.0.{expert_proj}"
    assert files.info(f"{prefix}.qweight").shape == (hidden * 4 // 32, inter)
    assert files.info(f"{prefix}.qzeros").shape == (hidden // 16, inter * 4 // 32)
    assert files.info(f"{prefix}.scales").shape == (hidden // 16, inter)
    assert files.info(f"{prefix}.scales").dtype == torch.float16
    assert files.info(f"{prefix}.g_idx").shape == (hidden,)
    for t in ("qweight", "qzeros", "g_idx"):
        assert files.info(f"{prefix}.{t}").dtype == torch.int32
    assert "model.layers.0.self_attn.q_proj.qweight" in files.key_to_file
    names = set(files.names())
    for key in src.names():  # routers, norms, embeddings, lm_head: kept as they are
        if key.endswith(".weight") and key.removesuffix(".weight") + ".qweight" not in names:
            assert key in names and files.info(key).dtype == src.info(key).dtype, key
    assert not [k for k in names if k.endswith(".weight") and ("experts." in k or "self_attn" in k)]
    assert not [k for k in names if re.search(r"(lm_head|embed_tokens|norm|\.gate)\.q", k)]


def test_existing_out_refused_and_options_checked(tiny_mixtral, tiny_checkpoint, tmp_path):
    out = tmp_path / "g"
    out.mkdir()
    with pytest.raises(MoeLocalError, match="--overwrite"):
        export_gptq(tiny_mixtral, out, 4, 16)
    seen: list[str] = []
    export_gptq(tiny_mixtral, out, 8, 16, overwrite=True, progress=lambda s, d, t, b: seen.append(s))
    assert is_gptq_checkpoint(out) and {"dense", "layer 0", "layer 1"} <= set(seen)
    with pytest.raises(MoeLocalError, match="bits"):
        export_gptq(tiny_mixtral, tmp_path / "b", 5, 16)
    with pytest.raises(MoeLocalError, match="group sizes"):
        export_gptq(tiny_mixtral, tmp_path / "b", 4, 100)
    with pytest.raises(MoeLocalError, match="3-bit"):  # 16-wide k/v projections
        export_gptq(tiny_mixtral, tmp_path / "b", 3, 16)
    with pytest.raises(MoeLocalError, match="does not support fused experts"):
        export_gptq(tiny_checkpoint("gpt_oss"), tmp_path / "b", 4, 16)
    with pytest.raises(MoeLocalError, match="already quantized"):
        export_gptq(out, tmp_path / "b", 4, 16)
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()

    def interrupt(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # an interrupted export leaves nothing behind
        export_gptq(tiny_mixtral, tmp_path / "k", 4, 16, progress=interrupt)
    assert not (tmp_path / "k").exists() and not (tmp_path / "k.partial").exists()


# ----------------------------------------------------------------------------- moe-local's load


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_load_equals_int_zero_rtn_and_is_close_to_source(exported, tiny_checkpoint, family):
    src = tiny_checkpoint(family)
    source = _logits(load(src))
    q4 = load_gptq(exported(family, 4), LoadOptions(dtype="float32"))
    assert isinstance(q4.model.model.layers[0].self_attn.q_proj, nn.Module)
    assert type(q4.model.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    w = q4.store.get(q4.sites[0].layer, 0)
    assert isinstance(w.gate_up, QuantizedTensor) and isinstance(w.down, QuantizedTensor)
    logits4 = _logits(q4)
    # exactly the weights moe-local's own RTN with integer zeros makes
    torch.testing.assert_close(logits4, _logits(_int_zero_reference(src, 4)), atol=1e-4, rtol=1e-4)
    # tiny random weights (std 0.2, attention quantized too) lose more at 4 bits than real models do
    assert _cos(source, logits4) > 0.9
    assert _cos(source, _logits(load_gptq(exported(family, 8)))) > 0.999


def test_offloaded_equals_in_memory_and_sizes(exported):
    from moe_local.loading.families import checkpoint_renamer

    out = exported("mixtral")
    full = load_gptq(out)
    files = CheckpointFiles(out)
    rename = checkpoint_renamer(full.model)
    experts = GptqExperts(out, files, full.sites, {rename(k): k for k in files.names()}, torch.float32)
    one = full.store.get(0, 0).nbytes
    assert experts.expert_nbytes(0) == one == experts.read(0, 1).nbytes
    assert experts.read(0, 1).gate_up.shape == (2 * 64, 32) and experts.read(0, 1).down.shape == (32, 64)
    off = load_gptq(out, LoadOptions(expert_memory=one))
    assert torch.equal(_logits(full), _logits(off))
    assert off.store.stats().total.misses > 0


def test_gptqmodel_names_option(exported, tiny_mixtral, tmp_path):
    from safetensors import safe_open

    out = export_gptq(tiny_mixtral, tmp_path / "g", 4, 16, names="gptqmodel")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.3.gate_proj.qweight" in index
    assert not any(".block_sparse_moe." in k or ".w1." in k for k in index)
    with safe_open(str(out / index["model.layers.0.mlp.experts.3.down_proj.qweight"]), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.experts.3.down_proj.qweight").dtype == torch.int32
    # the same weights under either name set, and moe-local reads both
    assert torch.equal(_logits(load_gptq(exported("mixtral"))), _logits(load_gptq(out)))
    assert torch.equal(_logits(load_gptq(_gptqmodel_names_copy(exported("mixtral"), tmp_path / "c"))),
                       _logits(load_gptq(out)))  # fmt: skip


def test_reader_reads_gptq_v2_and_refuses_other_formats(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    src = exported("qwen2_moe")
    v2 = tmp_path / "v2"
    shutil.copytree(src, v2)
    for shard in set(json.loads((v2 / "model.safetensors.index.json").read_text())["weight_map"].values()):
        tensors = load_file(v2 / shard)
        for key in [k for k in tensors if k.endswith(".qzeros")]:  # v2 stores the zero itself
            out_features = tensors[key.replace(".qzeros", ".scales")].shape[1]
            tensors[key] = pack_cols(qzeros_from_checkpoint(tensors[key], 4, 1, out_features), 4)
        save_file(tensors, v2 / shard, metadata={"format": "pt"})
    config = json.loads((v2 / "config.json").read_text())
    config["quantization_config"].update(checkpoint_format="gptq_v2", format="gptq_v2")
    (v2 / "config.json").write_text(json.dumps(config))
    assert torch.equal(_logits(load_gptq(src)), _logits(load_gptq(v2)))
    config["quantization_config"].update(checkpoint_format="marlin", format="marlin")
    (v2 / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="'marlin' is not supported"):
        load_gptq(v2)


def test_three_bit_end_to_end(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("mixtral", hidden_size=64, num_key_value_heads=4)
    out = export_gptq(src, tmp_path / "g3", 3, 16)
    assert CheckpointFiles(out).info("model.layers.0.block_sparse_moe.experts.0.w1.qweight").shape == (6, 64)
    torch.testing.assert_close(
        _logits(load_gptq(out)), _logits(_int_zero_reference(src, 3)), atol=1e-4, rtol=1e-4
    )


def _gptqmodel_names_copy(folder: Path, dst: Path) -> Path:
    """Copy a Mixtral export with the expert names GPTQModel 7.6 uses (mlp.experts.E.gate_proj)."""
    from safetensors.torch import load_file, save_file

    proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

    def rename(key: str) -> str:
        key = key.replace(".block_sparse_moe.", ".mlp.")
        return re.sub(r"\.experts\.(\d+)\.(w[123])\.", lambda m: f".experts.{m[1]}.{proj[m[2]]}.", key)

    shutil.copytree(folder, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        tensors = load_file(dst / shard)
        save_file({rename(k): v for k, v in tensors.items()}, dst / shard, metadata={"format": "pt"})
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


# ----------------------------------------------------------------------------- GPTQModel's load

_GPTQMODEL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    try:
        from gptqmodel import BACKEND, GPTQModel
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear
        from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module
    except Exception as exc:
        print("IMPORT-FAILED", type(exc).__name__, exc)
        sys.exit(3)
    from moe_local.convert.gptq_export import gptq_tensors
    out_file, ids_file, *folders = sys.argv[1:]
    result = {"dequant": {}, "logits": {}}
    torch.manual_seed(0)
    for bits in (2, 3, 4, 8):  # GPTQModel's own unpacking of the exported tensors, every bit width
        w = torch.randn(64, 64)
        w[:2, :16] = w[:2, :16].abs()
        t = gptq_tensors(w, bits, 16)
        m = TorchLinear(bits=bits, group_size=16, sym=False, desc_act=False,
                        in_features=64, out_features=64, bias=False).eval()
        for k, v in t.items():
            getattr(m, k).copy_(v)
        convert_gptq_v1_to_v2_format_module(m, bits=bits, pack_dtype=torch.int32)
        result["dequant"][bits] = (t, m.dequantize_weight().T.contiguous())
    ids = torch.load(ids_file)
    for folder in folders:
        model = GPTQModel.load(folder, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        with torch.no_grad():
            result["logits"][folder] = model.model(ids).logits
    torch.save(result, out_file)
    """
)


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="gptqmodel is not installed")
def test_gptqmodel_loads_the_export(exported, tiny_checkpoint, tmp_path):
    """GPTQModel (run in a subprocess: importing it patches transformers' MoE classes) loads the export.

    Tolerances: the same fp16 weights W_hat; moe-local in fp16 is within 1e-2 of GPTQModel's fp16
    logits, and moe-local in fp32 has cosine > 0.9999 with them.
    """
    qwen = exported("qwen2_moe")
    # GPTQModel 7.6 names Mixtral experts as transformers' unfused modules, not as on disk (which vLLM needs)
    mixtral = export_gptq(tiny_checkpoint("mixtral"), tmp_path / "gptqmodel-names", 4, 16, names="gptqmodel")
    torch.save(IDS, tmp_path / "ids.pt")
    # TORCHDYNAMO_DISABLE: GPTQModel torch.compiles its dequantization: seconds spent, nothing changed
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "TORCHDYNAMO_DISABLE": "1", "PYTHONPATH": path}
    args = [sys.executable, "-c", _GPTQMODEL_SCRIPT, str(tmp_path / "r.pt"), str(tmp_path / "ids.pt")]
    proc = subprocess.run(
        [*args, str(qwen), str(mixtral)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if proc.returncode == 3 and "IMPORT-FAILED" in proc.stdout:
        pytest.skip(f"gptqmodel does not import: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(tmp_path / "r.pt")
    for bits, (tensors, theirs) in result["dequant"].items():
        ours = gptq_to_quantized(tensors, bits, 1, f"{bits}-bit").dequantize()
        assert torch.equal(ours.to(torch.float16), theirs), bits
    for folder, theirs in result["logits"].items():
        ours16 = _logits(load_gptq(folder, LoadOptions(dtype="float16")))
        torch.testing.assert_close(ours16.float(), theirs.float(), atol=1e-2, rtol=1e-2)
        ours32 = _logits(load_gptq(folder, LoadOptions(dtype="float32")))
        assert _cos(ours32, theirs) > 0.9999
        assert torch.equal(ours32.argmax(-1), theirs.argmax(-1))
