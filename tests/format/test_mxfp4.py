"""MXFP4 checkpoints (GPT-OSS layout): experts read exactly as transformers dequantizes them.

The tests write a tiny gpt_oss checkpoint the way OpenAI publishes GPT-OSS: each fused expert
projection as ``{m}_blocks`` (uint8, two FP4 codes a byte, 32 values a block) and ``{m}_scales``
(uint8 e8m0 exponents), everything else in bf16; transformers 5.24 loads it on CPU with
``Mxfp4Config(dequantize=True)``, the reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Mxfp4Config
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from moe_local.config import LoadOptions, SamplingParams
from moe_local.convert.writer import quantize_checkpoint
from moe_local.errors import CheckpointError
from moe_local.format.mxfp4 import dequantize_mxfp4
from moe_local.generation import generate
from moe_local.loading.checkpoint import open_checkpoint
from moe_local.loading.loader import load
from moe_local.recipes import load_recipe
from tests.helpers import assert_one_line_error, run_cli

_FUSED = ("experts.gate_up_proj", "experts.down_proj")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def write_mxfp4_checkpoint(src: Path, out: Path, seed: int = 0) -> Path:
    """``src`` (a tiny gpt_oss checkpoint) with random MXFP4 experts in GPT-OSS's layout, in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, t in load_file(src / "model.safetensors").items():
        if key.endswith(_FUSED):  # kept as [E, C, R] (in, out); stored as R rows of C / 32 blocks
            experts, cols, rows = t.shape
            shape = (experts, rows, cols // 32)
            tensors[key + "_blocks"] = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=g)
            tensors[key + "_scales"] = torch.randint(121, 126, shape, dtype=torch.uint8, generator=g)
        else:
            tensors[key] = t.to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {"modules_to_not_convert": NOT_CONVERTED, "quant_method": "mxfp4"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in _TOKENIZER:
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_transformers_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 150, (3, 10, 2), dtype=torch.uint8, generator=g)
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, 64, 10]
    assert torch.equal(dequantize_mxfp4(blocks, scales, dtype), want)
    assert torch.equal(dequantize_mxfp4(blocks[1], scales[1], dtype), want[1])  # one expert at a time
    # by hand: byte 0x2F holds code 15 (-6.0) then code 2 (1.0); a scale of 128 doubles them
    one = dequantize_mxfp4(
        torch.full((1, 1, 16), 0x2F, dtype=torch.uint8), torch.full((1, 1), 128, dtype=torch.uint8), dtype
    )
    assert one.shape == (32, 1) and one[0, 0] == -12.0 and one[1, 0] == 2.0


@pytest.fixture(scope="module")
def mxfp4_pair(tiny_checkpoint, tmp_path_factory):
    folder = write_mxfp4_checkpoint(tiny_checkpoint("gpt_oss"), tmp_path_factory.mktemp("mxfp4") / "gpt-oss")
    ref = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True)
    ).eval()
    return folder, ref


def test_experts_are_transformers_dequantized_bit_for_bit(mxfp4_pair):
    folder, ref = mxfp4_pair
    ckpt = open_checkpoint(folder, dtype=torch.float32)
    assert not [k for k in ckpt.files.names() if k.endswith(("_blocks", "_scales"))]
    state = ref.state_dict()
    for site in ckpt.sites:
        for e in range(site.num_experts):
            w = ckpt.experts.read(site.layer, e)
            assert torch.equal(w.gate_up, state[f"{site.name}.gate_up_proj"][e].t())
            assert torch.equal(w.down, state[f"{site.name}.down_proj"][e].t())
            assert torch.equal(w.gate_up_bias, state[f"{site.name}.gate_up_proj_bias"][e])
    dense = ckpt.dense_keys()
    ckpt.load_dense()
    for name in dense:
        assert torch.equal(ckpt.meta.state_dict()[name], state[name]), name


@pytest.mark.parametrize("budget", [None, "one-expert"])
def test_logits_and_greedy_match_transformers(mxfp4_pair, budget):
    folder, ref = mxfp4_pair
    opts = LoadOptions(dtype="float32")
    if budget:
        probe = load(folder, opts)
        opts = LoadOptions(
            dtype="float32", expert_memory=max(probe.store.get(s.layer, 0).nbytes for s in probe.sites)
        )
    lm = load(folder, opts)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids).logits, lm.model(ids).logits
    assert float((want - got).abs().max() / want.abs().max()) < 1e-4
    prompt = lm.tokenizer.encode("The quick brown fox")
    ours = generate(lm, prompt, SamplingParams(max_tokens=24, ignore_eos=True)).tokens
    theirs = ref.generate(
        torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None
    )[0, len(prompt) :].tolist()
    assert ours == theirs
    if budget:
        assert lm.store.stats().total.misses > 0


def test_generate_cli_runs_an_mxfp4_folder(mxfp4_pair, capsys):
    folder, _ = mxfp4_pair
    code, _, err = run_cli(capsys, "generate", str(folder), "hi", "-n", "4", "--no-chat")
    assert code == 0, err


def test_quantize_from_mxfp4_works_and_loads(mxfp4_pair, tmp_path):
    folder, ref = mxfp4_pair
    out = tmp_path / "q"
    quantize_checkpoint(folder, out, load_recipe("experts-4bit"))
    q = load(out, LoadOptions(dtype="float32"))
    ids = torch.randint(0, 250, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, q.model(ids).logits
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.97


def _broken(folder: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(folder, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _first(tensors: dict, suffix: str) -> str:
    return next(k for k in tensors if k.endswith(suffix))


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (
            lambda t: t.__setitem__(_first(t, "down_proj_scales"), torch.zeros(4, 32, 3, dtype=torch.uint8)),
            "needs uint8",
        ),
        (lambda t: t.pop(_first(t, "down_proj_scales")), "has no"),
        (lambda t: t.pop(_first(t, "gate_up_proj_blocks")), "has no"),
    ],
    ids=["scale-shape", "no-scales", "no-blocks"],
)
def test_malformed_mxfp4_is_one_line(mxfp4_pair, tmp_path, capsys, edit, needle):
    folder = _broken(mxfp4_pair[0], tmp_path, edit)
    with pytest.raises(CheckpointError, match=needle):
        open_checkpoint(folder)
    code, _, err = run_cli(capsys, "generate", str(folder), "hi", "-n", "2", "--no-chat")
    assert_one_line_error(code, err, needle)
