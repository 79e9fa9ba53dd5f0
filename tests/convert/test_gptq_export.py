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
    unpack_rows,
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
    """Factory: ``exported(family, bits) -> asymmetric GPTQ folder`` (groups of 16), cached per module."""
    made: dict[tuple[str, int], Path] = {}

    def make(family: str, bits: int = 4) -> Path:
        if (family, bits) not in made:
            out = tmp_path_factory.mktemp(f"gptq-{family}-{bits}") / "out"
            made[(family, bits)] = export_gptq(tiny_checkpoint(family), out, bits, 16, sym=False)
        return made[(family, bits)]

    return make


def _logits(lm) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(IDS).logits


def _dequant_int_zero(w: torch.Tensor, bits: int, group_size: int = 16, sym: bool = False) -> torch.Tensor:
    codes, scales, zeros = rtn_int_zero(w, bits, group_size, sym=sym)
    o, i = w.shape
    groups = codes.view(o, -1, group_size).float() - zeros.float()[..., None]
    return (groups * scales.float()[..., None]).view(o, i)


def _int_zero_reference(src: Path, bits: int, sym: bool = False):
    """The fp32 source with every exported weight replaced by its RTN int-zero reconstruction."""
    from moe_local.convert.gptq_export import _quantizable_linears

    ref = load(src)
    for name in _quantizable_linears(ref.model):
        m = ref.model.get_submodule(name)
        m.weight.data = _dequant_int_zero(m.weight.data, bits, sym=sym)
    for site in ref.sites:
        for e in range(site.num_experts):
            w = ref.store.get(site.layer, e)
            half = w.gate_up.shape[0] // 2
            parts = (w.gate_up[:half], w.gate_up[half:])
            w.gate_up = torch.cat([_dequant_int_zero(p, bits, sym=sym) for p in parts])
            w.down = _dequant_int_zero(w.down, bits, sym=sym)
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

    out = export_gptq(tiny_mixtral, tmp_path / "g", 4, 16, sym=False, names="gptqmodel")
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
    out = export_gptq(src, tmp_path / "g3", 3, 16, sym=False)
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
    mixtral = export_gptq(
        tiny_checkpoint("mixtral"), tmp_path / "gptqmodel-names", 4, 16, sym=False, names="gptqmodel"
    )
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


# ----------------------------------------------------------------------------- symmetric GPTQ


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_rtn_uses_the_middle_zero_and_clips_nothing(bits):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    w[0, :16] = w[0, :16].abs() + 0.5  # all positive: half the grid goes unused, nothing clips
    w[2, :16] = 0.0
    codes, scales, zeros = rtn_int_zero(w, bits, 16, sym=True)
    assert bool((zeros == 1 << (bits - 1)).all())
    assert int(codes.max()) <= (1 << bits) - 1 and bool((scales > 0).all())
    groups = codes.view(32, 4, 16).float() - zeros.float()[..., None]
    w_hat = (groups * scales.float()[..., None]).view(32, 64)
    err = (w - w_hat).abs().view(32, 4, 16)
    assert bool((err <= scales.float()[..., None] * 0.51).all())
    assert torch.equal(w_hat[2, :16], torch.zeros(16))


def test_symmetric_qzeros_are_the_v1_words_runtimes_expect():
    """Zero 2**(bits-1) stored minus one in every field: 0x77777777 at 4 bits, as GPTQModel writes it."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
    words = {2: 0x55555555, 4: 0x77777777, 8: 0x7F7F7F7F}
    for bits, word in words.items():
        q = gptq_tensors(w, bits, 32, sym=True)["qzeros"]
        assert q.dtype == torch.int32 and bool((q == word).all()), bits
    three = gptq_tensors(w, 3, 32, sym=True)["qzeros"]  # 32 zeros of 3 in 3 words: a repeating pattern
    assert torch.equal(qzeros_from_checkpoint(three, 3, 1, 64), torch.full((2, 64), 4, dtype=torch.int64))


def test_symmetric_export_is_the_default_and_loads(tiny_mixtral, tmp_path):
    out = export_gptq(tiny_mixtral, tmp_path / "s", 4, 16)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["sym"] is True and json.loads((out / "quantize_config.json").read_text())["sym"] is True
    lm = load_gptq(out, LoadOptions(dtype="float32"))
    w = load(tiny_mixtral).store.get(0, 1).down
    codes, scales, _ = rtn_int_zero(w, 4, 16, sym=True)
    expected = ((codes.view(32, -1, 16).float() - 8) * scales.float()[..., None]).view_as(w)
    assert torch.equal(lm.store.get(0, 1).down.dequantize(), expected)
    reference = _logits(_int_zero_reference(tiny_mixtral, 4, sym=True))
    torch.testing.assert_close(_logits(lm), reference, atol=1e-4, rtol=1e-4)
    q8 = load_gptq(export_gptq(tiny_mixtral, tmp_path / "s8", 8, 16), LoadOptions(dtype="float32"))
    assert _cos(_logits(load(tiny_mixtral)), _logits(q8)) > 0.999


# ----------------------------------------------------------------------------- what vLLM and SGLang read
# From vLLM's loaders (vllm/model_executor/layers/quantization/auto_gptq.py, gptq.py, moe_wna16.py;
# SGLang's python/sglang/srt/layers/quantization/gptq.py and moe_wna16.py follow them):
# * config: quant_method "gptq", bits, group_size, desc_act, sym, lm_head; quantize_config.json;
#   sym and bits 4/8 with groups -1/32/64/128 -> the Marlin path (linears and experts), which
#   takes the zero as 2**(bits-1) (uint4b8 / uint8b128) and never reads qzeros' values.
# * every quantized linear (attention, shared experts, dense MLPs) creates qweight int32
#   [I / pack, O], g_idx int32 [I], qzeros int32 [G, O / pack], scales [G, O] (fp16 under fp16).
# * experts map ``experts.{e}.{w1|w3|gate_proj|up_proj}.X`` into ``w13_X`` and
#   ``experts.{e}.{w2|down_proj}.X`` into ``w2_X``. Marlin (transposed) takes them as they are:
#   w13_qweight [E, H / pack, 2 * N] int32, w13_scales [E, H / group, 2 * N], w13_qzeros
#   [E, H / group, 2 * N / pack], w13_g_idx [E, H]; w2_* with H and N swapped.
# * moe_wna16 (asymmetric, --quantization moe_wna16): qweight.T viewed as uint8 -> w13_qweight
#   [E, 2 * N, H * bits / 8]; scales.T -> [E, 2 * N, H / group]; 4-bit qzeros viewed as uint8,
#   each nibble + 1, transposed -> w13_qzeros [E, 2 * N / 2, H / group]; g_idx is skipped. Routers,
#   ``shared_expert_gate``, norms, embeddings and lm_head: ``.weight`` in float.


def _vllm_linear_reads(in_f: int, out_f: int, bits: int, group: int) -> dict:
    """What a GPTQ linear's create_weights registers (name -> (shape, dtype)) for ``[out_f, in_f]``."""
    pack, g = 32 // bits, in_f // group
    return {
        "qweight": ((in_f // pack, out_f), torch.int32),
        "g_idx": ((in_f,), torch.int32),
        "qzeros": ((g, out_f // pack), torch.int32),
        "scales": ((g, out_f), torch.float16),
    }


def _wna16_int4_zeros(qzeros: torch.Tensor) -> torch.Tensor:
    """moe_wna16's reading of v1 4-bit qzeros: bytes, each nibble plus one, back in bytes (uint8 [G, O/2])."""
    b = qzeros.contiguous().view(torch.uint8)
    lo, hi = (b & 0xF) + 1, (b >> 4) + 1
    return lo + hi * 16


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """uint8 [R, C] -> codes [R, 2C], low nibble first (how moe_wna16's kernel reads a byte)."""
    return torch.stack([b & 0xF, b >> 4], dim=-1).view(b.shape[0], -1).to(torch.int64)


@pytest.mark.parametrize("sym", [True, False], ids=["sym-marlin", "asym-moe_wna16"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_every_tensor_vllm_and_sglang_read(tiny_checkpoint, tmp_path, family, sym):
    from safetensors import safe_open

    bits, group = 4, 32
    overrides = (
        {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 64} if family == "qwen2_moe" else {}
    )
    src = tiny_checkpoint(family, **overrides)
    out = export_gptq(src, tmp_path / "g", bits, group, sym=sym)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["desc_act"], q["sym"], q["lm_head"]) == (
        "gptq", bits, group, False, sym, False)  # fmt: skip
    assert q["checkpoint_format"] == "gptq" and not q.get("is_marlin_format")  # not pre-packed Marlin
    assert json.loads((out / "quantize_config.json").read_text()) == q
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    src_files, files = CheckpointFiles(src), CheckpointFiles(out)
    assert set(index) == set(files.names())
    quantized = re.compile(
        r"\.(self_attn\.[qkvo]_proj|experts\.\d+\.(w[123]|gate_proj|up_proj|down_proj)"
        r"|shared_expert\.(gate|up|down)_proj|mlp\.(gate|up|down)_proj)\.weight$"
    )
    linears = 0
    for key in src_files.names():
        if quantized.search(key):  # a linear vLLM builds with the GPTQ method: its four tensors
            out_f, in_f = src_files.info(key).shape
            prefix = key.removesuffix(".weight")
            for name, (shape, dtype) in _vllm_linear_reads(in_f, out_f, bits, group).items():
                info = files.info(f"{prefix}.{name}")
                assert (tuple(info.shape), info.dtype) == (shape, dtype), f"{prefix}.{name}"
            assert key not in index
            linears += 1
        else:  # routers, shared_expert_gate, norms, embeddings, lm_head: read as they are
            assert key in index and files.info(key).dtype == src_files.info(key).dtype, key
            assert tuple(files.info(key).shape) == tuple(src_files.info(key).shape)
    assert linears > 0 and not [k for k in index if re.search(r"\.(gate|shared_expert_gate)\.q", k)]

    # the experts of layer 0 as vLLM fuses them, checked against create_weights' shapes and values
    ref = load_gptq(out, LoadOptions(dtype="float32"))
    site = ref.sites[0]
    config = json.loads((src / "config.json").read_text())
    hidden = config["hidden_size"]
    inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    experts = config.get("num_local_experts") or config["num_experts"]
    experts_prefix = {
        "mixtral": "model.layers.0.block_sparse_moe.experts",
        "qwen2_moe": "model.layers.0.mlp.experts",
    }[family]
    parts = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    pack = 32 // bits

    def read(e: int, part: str, name: str) -> torch.Tensor:
        key = f"{experts_prefix}.{e}.{part}.{name}"
        with safe_open(str(out / index[key]), "pt") as f:
            return f.get_tensor(key)

    for e in range(experts):
        w13 = {
            name: torch.cat([read(e, p, name) for p in parts[:2]], dim=-1)
            for name in ("qweight", "qzeros", "scales")
        }
        w2 = {name: read(e, parts[2], name) for name in ("qweight", "qzeros", "scales")}
        want = ref.store.get(site.layer, e)
        if sym:  # Marlin: transposed, as stored; the zero is 8 whatever qzeros holds
            assert tuple(w13["qweight"].shape) == (hidden // pack, 2 * inter)
            assert tuple(w13["scales"].shape) == (hidden // group, 2 * inter)
            assert tuple(w13["qzeros"].shape) == (hidden // group, 2 * inter // pack)
            assert tuple(w2["qweight"].shape) == (inter // pack, hidden)
            assert tuple(w2["scales"].shape) == (inter // group, hidden)
            assert tuple(w2["qzeros"].shape) == (inter // group, hidden // pack)
            for t, w in ((w13, want.gate_up), (w2, want.down)):
                codes = unpack_rows(t["qweight"], bits).t().float()  # [O, I]
                scale = t["scales"].t().float().repeat_interleave(group, dim=1)
                assert torch.equal((codes - 8) * scale, w.dequantize().float())
        else:  # moe_wna16: qweight.T as bytes, scales.T, qzeros nibbles + 1
            qw13 = w13["qweight"].t().contiguous().view(torch.uint8)
            qw2 = w2["qweight"].t().contiguous().view(torch.uint8)
            assert tuple(qw13.shape) == (2 * inter, hidden // (8 // bits))
            assert tuple(qw2.shape) == (hidden, inter // (8 // bits))
            z13 = torch.cat([_wna16_int4_zeros(read(e, p, "qzeros")).t() for p in parts[:2]])
            z2 = _wna16_int4_zeros(w2["qzeros"]).t()
            assert tuple(z13.shape) == (2 * inter // 2, hidden // group)
            assert tuple(z2.shape) == (hidden // 2, inter // group)
            assert tuple(w13["scales"].t().shape) == (2 * inter, hidden // group)
            for qw, z, s, w in ((qw13, z13, w13["scales"], want.gate_up), (qw2, z2, w2["scales"], want.down)):
                codes = _nibbles(qw).float()  # [O, I]
                zeros = _nibbles(z.t().contiguous()).t().float().repeat_interleave(group, dim=1)  # [O, I]
                scale = s.t().float().repeat_interleave(group, dim=1)
                assert torch.equal((codes - zeros) * scale, w.dequantize().float())


def test_serving_notes():
    from moe_local.convert.gptq_export import serving_notes

    sym = serving_notes("out", 4, 128, True)
    assert sym == [
        "serve with vLLM:   vllm serve out",
        "serve with SGLang: python -m sglang.launch_server --model-path out",
    ]
    asym = "\n".join(serving_notes("out", 4, 128, False))
    assert "vllm serve out --quantization moe_wna16 --dtype float16" in asym
    assert "--model-path out --quantization moe_wna16 --dtype float16" in asym
    assert "per channel" in serving_notes("out", 8, 128, False)[0]
    assert "4- and 8-bit" in serving_notes("out", 3, 128, True)[0]
    assert "groups of 32, 64 or 128" in serving_notes("out", 4, 16, True)[0]


def test_cli_sym_and_asym(tiny_mixtral, tmp_path, capsys):
    from tests.helpers import assert_one_line_error, run_cli

    code, out, err = run_cli(
        capsys, "quantize", str(tiny_mixtral), str(tmp_path / "s"), "--format", "gptq", "--group-size", "32"
    )
    assert code == 0, err
    assert "symmetric" in out and "vllm serve" in out and "moe_wna16" not in out
    assert json.loads((tmp_path / "s" / "config.json").read_text())["quantization_config"]["sym"] is True
    code, out, err = run_cli(
        capsys,
        "quantize",
        str(tiny_mixtral),
        str(tmp_path / "a"),
        "--format",
        "gptq",
        "--group-size",
        "32",
        "--asym",
    )
    assert code == 0, err
    assert "asymmetric" in out and "--quantization moe_wna16 --dtype float16" in out
    assert json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]["sym"] is False
    code, _, err = run_cli(capsys, "quantize", str(tiny_mixtral), str(tmp_path / "m"), "--asym")
    assert_one_line_error(code, err, "--format moe-local does not take --sym/--asym")
