"""FP8 block-quantized checkpoints (DeepSeek-V3, Qwen3-FP8 layout): read as transformers dequantizes them.

The tests write tiny checkpoints in the publishers' layout (fp8 ``weight`` with a float32
``weight_scale_inv`` per block, routers, norms, embeddings and lm_head unquantized in bf16) and
compare moe-local with transformers' own dequantization of the same tensors (``Fp8Dequantize``):
transformers 5.24 loads FP8 folders on CPU only with accelerate installed, which moe-local does
not require, so the reference is the folder dequantized by transformers' function and saved as
float32 (and, where accelerate is installed, transformers' own load of the FP8 folder too).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

from moe_local.config import LoadOptions, SamplingParams
from moe_local.convert.writer import quantize_checkpoint
from moe_local.errors import CheckpointError
from moe_local.format.fp8 import Fp8Config, dequantize_fp8, fp8_files, scale_grid
from moe_local.format.safetensors_io import CheckpointFiles
from moe_local.generation import generate
from moe_local.loading.checkpoint import open_checkpoint
from moe_local.loading.loader import load
from moe_local.recipes import load_recipe
from tests.helpers import assert_one_line_error, run_cli

BLOCK = (
    4,
    8,
)  # rows x columns: divides every tiny shape (transformers' dequantizer needs it), and not square
FP8_MAX = 448.0
_KEPT = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight")  # what DeepSeek and Qwen leave unquantized
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[O, I]`` -> fp8 ``[O, I]`` and float32 scale_inv ``[ceil(O/bo), ceil(I/bi)]`` (amax / 448)."""
    rows, cols = w.shape
    bo, bi = block
    gr, gc = scale_grid((rows, cols), block)
    padded = torch.zeros(gr * bo, gc * bi)
    padded[:rows, :cols] = w.float()
    amax = padded.view(gr, bo, gc, bi).abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    full = scale_inv.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:rows, :cols]
    q = (w.float() / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale_inv.float()


def write_fp8_checkpoint(src: Path, out: Path, block: tuple[int, int] = BLOCK) -> Path:
    """``src`` (a tiny float checkpoint) in the FP8 publishers' layout, in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, t in load_file(src / "model.safetensors").items():
        if t.dim() == 2 and key.endswith(".weight") and not any(k in key for k in _KEPT):
            tensors[key], tensors[key + "_scale_inv"] = quantize_fp8(t, block)
        else:
            tensors[key] = t.to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in _TOKENIZER:
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    return out


def dequantized_by_transformers(fp8: Path, out: Path) -> Path:
    """The FP8 folder with each quantized weight dequantized by transformers' ``Fp8Dequantize`` (float32)."""
    shutil.copytree(fp8, out)
    stored = load_file(fp8 / "model.safetensors")
    op = Fp8Dequantize(None)
    tensors = {}
    for key, t in stored.items():
        if key.endswith("_scale_inv"):
            continue
        scale = stored.get(key + "_scale_inv")
        tensors[key] = (
            t.float() if scale is None else op._dequantize_one(t, scale, output_dtype=torch.float32)
        )
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# ----------------------------------------------------------------------------- the dequantizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_transformers_bit_for_bit(dtype):
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    q, s = quantize_fp8(w, (8, 8))
    want = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=dtype)
    assert torch.equal(dequantize_fp8(q, s, (8, 8), dtype), want)
    stacked = dequantize_fp8(torch.stack([q, q]), torch.stack([s, s]), (8, 8), dtype)  # fused [E, O, I]
    assert torch.equal(stacked, torch.stack([want, want]))


def test_partial_blocks_match_transformers_and_the_definition():
    # DeepSeek's kv_a_proj_with_mqa is 576 rows in blocks of 128: its last block row is partial.
    # transformers' load-time dequantizer refuses such shapes; its backward-pass one handles them.
    w = torch.randn(20, 36, generator=torch.Generator().manual_seed(1))
    q, s = quantize_fp8(w, (8, 16))
    assert tuple(s.shape) == (3, 3)
    got = dequantize_fp8(q, s, (8, 16), torch.float32)
    assert torch.equal(got, _dequantize_fp8_weight(q, s, [8, 16], torch.float32))
    for o, i in ((0, 0), (19, 35), (16, 31), (7, 17)):
        assert float(got[o, i]) == float(q[o, i].float() * s[o // 8, i // 16])
    assert float((got - w).abs().max() / w.abs().max()) < 0.07  # e4m3: 3 mantissa bits


def test_ue8m0_and_per_tensor_scales():
    q, _ = quantize_fp8(torch.randn(16, 16, generator=torch.Generator().manual_seed(2)), (8, 8))
    exps = torch.tensor([[120, 127], [130, 125]], dtype=torch.uint8)  # e8m0: 2 ** (byte - 127)
    want = Fp8Dequantize(None)._dequantize_one(q, exps, output_dtype=torch.float32)
    assert torch.equal(dequantize_fp8(q, exps, (8, 8), torch.float32), want)
    one = torch.tensor(0.25)
    assert torch.equal(dequantize_fp8(q, one, None, torch.float32), q.float() * 0.25)


def test_fused_experts_read_one_expert_at_a_time(tmp_path):
    w = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(4))
    pairs = [quantize_fp8(w[e], (8, 8)) for e in range(3)]
    q, s = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    key = "m.experts.gate_up_proj"
    stored = {key: q, key + "_scale_inv": s, "m.norm.weight": torch.ones(4)}
    stored |= {
        "m.o.weight": pairs[0][0],
        "m.o.weight_scale_inv": pairs[0][1],
        "m.o.activation_scale": torch.ones(()),
    }
    save_file(stored, tmp_path / "model.safetensors")
    files = fp8_files(CheckpointFiles(tmp_path), Fp8Config((8, 8)), torch.float32)
    assert sorted(files.names()) == [
        key,
        "m.norm.weight",
        "m.o.weight",
    ]  # scales hidden, activation scale dropped
    assert files.info(key).dtype == torch.float32 and files.info(key).nbytes == 3 * 16 * 24 * 4
    whole = files.read(key)
    assert torch.equal(whole, dequantize_fp8(q, s, (8, 8), torch.float32))
    for e in range(3):
        assert torch.equal(files.read_slice(key, e), whole[e])
    out = torch.empty(2, 3 * 16 * 24)
    assert torch.equal(files.read(key, out=out[1]), whole) and torch.equal(out[1].view(3, 16, 24), whole)


# ----------------------------------------------------------------------------- whole checkpoints


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def fp8_pair(request, tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"fp8-{request.param}")
    fp8 = write_fp8_checkpoint(tiny_checkpoint(request.param), base / "fp8")
    ref_folder = dequantized_by_transformers(fp8, base / "ref")
    ref = AutoModelForCausalLM.from_pretrained(ref_folder, dtype=torch.float32).eval()
    return request.param, fp8, ref_folder, ref


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def test_weights_are_transformers_dequantized_bit_for_bit(fp8_pair):
    _, fp8, ref_folder, _ = fp8_pair
    want = load_file(ref_folder / "model.safetensors")
    ckpt = open_checkpoint(fp8, dtype=torch.float32)
    assert set(ckpt.files.names()) == set(want)  # the scales are hidden; nothing else is
    for key in want:
        assert torch.equal(ckpt.files.read(key), want[key]), key
    for site in ckpt.sites:
        w = ckpt.experts.read(site.layer, 1)
        prefix = next(k for k in want if f".{site.layer}.mlp.experts.1.down_proj" in k).rsplit(".", 2)[0]
        assert torch.equal(w.down, want[f"{prefix}.down_proj.weight"])
        gate_up = torch.cat([want[f"{prefix}.gate_proj.weight"], want[f"{prefix}.up_proj.weight"]])
        assert torch.equal(w.gate_up, gate_up)


def test_quantize_reads_bfloat16_as_transformers_dequantizes(fp8_pair):
    _, fp8, _, _ = fp8_pair
    stored = load_file(fp8 / "model.safetensors")
    ckpt = open_checkpoint(fp8, dtype=torch.float32, expert_dtype=None)  # what quantize opens
    for key in (
        next(k for k in stored if k.endswith(s)) for s in ("experts.2.down_proj.weight", "o_proj.weight")
    ):
        want = Fp8Dequantize(None)._dequantize_one(stored[key], stored[key + "_scale_inv"], torch.bfloat16)
        assert torch.equal(ckpt.files.read(key), want), key
    layer = ckpt.sites[0].layer
    assert {dt for _, dt in ckpt.experts.part_shapes(layer).values()} == {torch.bfloat16}
    assert ckpt.experts.read(layer, 0).down.dtype == torch.bfloat16


def test_partial_blocks_checkpoint_reads_as_deepseek_defines(tiny_checkpoint, tmp_path):
    # blocks of 8x8: kv_a_proj_with_mqa (20 rows) ends in a partial block row, as DeepSeek-V3's 576
    # rows do in blocks of 128; transformers' dequantizing load refuses it ("not divisible")
    fp8 = write_fp8_checkpoint(tiny_checkpoint("deepseek_v3"), tmp_path / "fp8", block=(8, 8))
    stored = load_file(fp8 / "model.safetensors")
    ckpt = open_checkpoint(fp8, dtype=torch.float32)
    partial = 0
    for key in ckpt.files.names():
        if key + "_scale_inv" in stored:
            want = _dequantize_fp8_weight(stored[key], stored[key + "_scale_inv"], [8, 8], torch.float32)
            assert torch.equal(ckpt.files.read(key), want), key
            partial += stored[key].shape[0] % 8 != 0
    assert partial == 3  # one per layer
    lm = load(fp8, LoadOptions(dtype="float32"))
    with torch.no_grad():
        assert torch.isfinite(lm.model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("budget", [None, "one-expert"])
def test_logits_and_greedy_match_transformers(fp8_pair, budget):
    family, fp8, _, ref = fp8_pair
    opts = LoadOptions(dtype="float32")
    if budget:
        probe = load(fp8, opts)
        opts = LoadOptions(
            dtype="float32", expert_memory=max(probe.store.get(s.layer, 0).nbytes for s in probe.sites)
        )
    lm = load(fp8, opts)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel_err(ref(ids).logits, lm.model(ids).logits) < 1e-4, family
    prompt = lm.tokenizer.encode("The quick brown fox")
    ours = generate(lm, prompt, SamplingParams(max_tokens=24, ignore_eos=True)).tokens
    theirs = ref.generate(
        torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None
    )[0, len(prompt) :].tolist()
    assert ours == theirs, family
    if budget:
        assert lm.store.stats().total.misses > 0


def test_transformers_own_fp8_load_agrees(fp8_pair):
    pytest.importorskip("accelerate")  # transformers loads FP8 folders on CPU only with accelerate
    _, fp8, _, ref = fp8_pair
    theirs = AutoModelForCausalLM.from_pretrained(fp8, dtype=torch.float32).eval()
    ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ref(ids).logits)


def test_generate_and_inspect_cli_run_an_fp8_folder(fp8_pair, capsys):
    _, fp8, _, _ = fp8_pair
    code, _, err = run_cli(capsys, "generate", str(fp8), "hi", "-n", "4", "--no-chat", "--dtype", "float32")
    assert code == 0, err
    code, out, err = run_cli(capsys, "inspect", str(fp8))
    assert code == 0 and "ForCausalLM" in out, err


def test_quantize_from_fp8_works_and_loads(fp8_pair, tmp_path):
    family, fp8, _, ref = fp8_pair
    out = tmp_path / "q"
    report = quantize_checkpoint(fp8, out, load_recipe("experts-4bit"))
    assert report.experts > 0
    q = load(out, LoadOptions(dtype="float32"))
    ids = torch.randint(0, 250, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, q.model(ids).logits
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.97, family


# ----------------------------------------------------------------------------- malformed folders


def _broken(fp8: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(fp8, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _first_scale(tensors: dict) -> str:
    return next(k for k in tensors if k.endswith("experts.0.up_proj.weight_scale_inv"))


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t.__setitem__(_first_scale(t), torch.ones(3, 3)), "in blocks of 4x8 needs"),
        (lambda t: t.pop(_first_scale(t)), "has no"),
        (lambda t: t.pop(_first_scale(t).removesuffix("_scale_inv")), "is a scale but"),
    ],
    ids=["scale-shape", "no-scale", "no-weight"],
)
def test_malformed_scales_are_one_line(fp8_pair, tmp_path, capsys, edit, needle):
    _, fp8, _, _ = fp8_pair
    folder = _broken(fp8, tmp_path, edit)
    with pytest.raises(CheckpointError, match=needle):
        open_checkpoint(folder)
    code, _, err = run_cli(capsys, "generate", str(folder), "hi", "-n", "2", "--no-chat")
    assert_one_line_error(code, err, needle)


def test_bad_block_size_is_one_line(fp8_pair, tmp_path, capsys):
    _, fp8, _, _ = fp8_pair
    folder = tmp_path / "bad-block"
    shutil.copytree(fp8, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [128]
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "generate", str(folder), "hi", "-n", "2", "--no-chat")
    assert_one_line_error(code, err, "weight_block_size")


def test_a_quant_method_not_read_is_one_line(fp8_pair, tmp_path, capsys):
    _, fp8, _, _ = fp8_pair
    folder = tmp_path / "awq"
    shutil.copytree(fp8, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "generate", str(folder), "hi", "-n", "2", "--no-chat")
    assert_one_line_error(code, err, "quant_method 'awq'")
