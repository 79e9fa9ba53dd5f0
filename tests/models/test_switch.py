"""Switch Transformers (encoder-decoder, top-1): exact against transformers' own class, loaded by moe-local.

The oracle is transformers' ``SwitchTransformersForConditionalGeneration`` on the same folder. The
tiny checkpoint has the released layout: config.json keys of google/switch-base-8 and its tensor
names (the tied embedding copies included), a tokenizer without a chat template (Switch has none),
and an ``expert_capacity`` of 1 so the encoder's router drops tokens, as the real one does on
prompts longer than its capacity. Matrices are ~N(0, 0.3) and embedding rows of norm 0.5: with
smaller layers a random tied-embedding decoder repeats one token, which would prove little.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch
from safetensors.torch import save_file
from transformers import SwitchTransformersForConditionalGeneration

from moe_local.batching import batch_support
from moe_local.config import LoadOptions, SamplingParams
from moe_local.errors import CheckpointError
from moe_local.generation import generate
from moe_local.inspection import inspect_model
from moe_local.loading.checkpoint import load_config
from moe_local.loading.loader import load
from moe_local.tiny import make_tokenizer
from tests.helpers import assert_one_line_error, run_cli
from tests.models.released import (
    PROMPT,
    TOKENS,
    check_exact_everywhere,
    headers_only_checkpoint,
    random_tensors,
)

# config.json of google/switch-base-8 as released (the model's real dimensions).
RELEASED = {
    "architectures": ["SwitchTransformersForConditionalGeneration"],
    "d_ff": 3072,
    "d_kv": 64,
    "d_model": 768,
    "decoder_sparse_step": 2,
    "decoder_start_token_id": 0,
    "dense_act_fn": "relu",
    "dropout_rate": 0.1,
    "encoder_sparse_step": 2,
    "eos_token_id": 1,
    "expert_capacity": 64,
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": False,
    "layer_norm_epsilon": 1e-06,
    "model_type": "switch_transformers",
    "num_decoder_layers": 12,
    "num_experts": 8,
    "num_heads": 12,
    "num_layers": 12,
    "num_sparse_decoder_layers": 6,
    "num_sparse_encoder_layers": 6,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "router_aux_loss_coef": 0.001,
    "router_bias": False,
    "router_dtype": "float32",
    "router_ignore_padding_tokens": False,
    "router_jitter_noise": 0.01,
    "router_type": "tokens_masked",
    "router_z_loss_coef": 0.001,
    "torch_dtype": "float32",
    "transformers_version": "4.25.0.dev0",
    "use_cache": True,
    "vocab_size": 32128,
}
TINY = RELEASED | {
    "d_ff": 48,
    "d_kv": 8,
    "d_model": 32,
    "num_heads": 4,
    "num_layers": 4,
    "num_decoder_layers": 4,
    "num_sparse_encoder_layers": 2,
    "num_sparse_decoder_layers": 2,
    "num_experts": 4,
    "expert_capacity": 1,  # 5 prompt tokens over 4 experts: the encoder drops at least one
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "vocab_size": 320,
    "pad_token_id": 258,  # the tiny tokenizer's <pad> and </s>; the decoder starts from <pad>, as T5's
    "eos_token_id": 257,
    "decoder_start_token_id": 258,
}
TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


def released_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Switch Transformers checkpoint, by its released name."""
    h, v, f, inner = cfg["d_model"], cfg["vocab_size"], cfg["d_ff"], cfg["num_heads"] * cfg["d_kv"]
    shapes = {"shared.weight": (v, h)} | dict.fromkeys(TIED, (v, h))
    stacks = {
        "encoder": (cfg["num_layers"], cfg["num_sparse_encoder_layers"], ("SelfAttention",)),
        "decoder": (
            cfg["num_decoder_layers"],
            cfg["num_sparse_decoder_layers"],
            ("SelfAttention", "EncDecAttention"),
        ),
    }
    for stack, (layers, sparse, attentions) in stacks.items():
        step = layers // sparse
        shapes[f"{stack}.final_layer_norm.weight"] = (h,)
        shapes[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
            cfg["relative_attention_num_buckets"],
            cfg["num_heads"],
        )
        for n in range(layers):
            b = f"{stack}.block.{n}.layer."
            for m, attention in enumerate(attentions):
                shapes |= {f"{b}{m}.{attention}.{x}.weight": (inner, h) for x in "qkv"}
                shapes |= {f"{b}{m}.{attention}.o.weight": (h, inner), f"{b}{m}.layer_norm.weight": (h,)}
            ff = f"{b}{len(attentions)}."
            shapes[ff + "layer_norm.weight"] = (h,)
            if n % step == 1:  # every other block is sparse (switch-base-8: blocks 1, 3, ..., 11)
                shapes[ff + "mlp.router.classifier.weight"] = (cfg["num_experts"], h)
                for e in range(cfg["num_experts"]):
                    shapes |= {ff + f"mlp.experts.expert_{e}.wi.weight": (f, h)}
                    shapes |= {ff + f"mlp.experts.expert_{e}.wo.weight": (h, f)}
            else:
                shapes |= {ff + "mlp.wi.weight": (f, h), ff + "mlp.wo.weight": (h, f)}
    return shapes


def write_folder(folder, cfg: dict, tensors: dict[str, torch.Tensor]):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), {"format": "pt"}
    )
    make_tokenizer(chat_template=None).save_pretrained(folder)
    return folder


def oracle_greedy(model, prompt=PROMPT, tokens=TOKENS) -> list[int]:
    """transformers' own greedy decoding of ``tokens`` decoder tokens (no early stop)."""
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        eos_token_id=None,
    )
    return out[0, 1:].tolist()  # after the decoder's start token


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(folder in the released layout, transformers' class on it, its greedy tokens)."""
    root = tmp_path_factory.mktemp("switch")
    tensors = random_tensors(released_shapes(TINY), seed=2)
    tensors = {k: 1.5 * t if t.dim() == 2 else t for k, t in tensors.items()}  # matrices ~N(0, 0.3)
    shared = tensors["shared.weight"]
    shared = 0.5 * shared / shared.norm(dim=1, keepdim=True)  # every row of norm 0.5
    tensors |= {name: shared.clone() for name in ("shared.weight", *TIED)}
    folder = write_folder(root / "tiny", TINY, tensors)
    oracle = SwitchTransformersForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, oracle, oracle_greedy(oracle)


def test_the_layout_is_transformers_own_and_the_oracle_says_something(released):
    _, oracle, want = released
    assert set(released_shapes(TINY)) == set(oracle.state_dict())
    assert len(want) == TOKENS and len(set(want)) > 4
    dropped = []
    hooks = [
        block.layer[-1].mlp.router.register_forward_hook(lambda m, i, out: dropped.append(int(out[0].sum())))
        for block in oracle.encoder.block
        if block.layer[-1].is_sparse
    ]
    with torch.no_grad():
        oracle.get_encoder()(input_ids=torch.tensor([PROMPT]))
    for h in hooks:
        h.remove()
    assert dropped and all(n < len(PROMPT) for n in dropped)  # capacity 1: some tokens get no expert


def test_moe_local_is_exact_in_memory_budgeted_and_quantizes(released, tmp_path):
    folder, _, want = released
    check_exact_everywhere(folder, want, tmp_path / "no-marker", tmp_path)


def test_encoder_and_decoder_experts_are_offloaded(released):
    folder, _, want = released
    lm = load(folder, LoadOptions(dtype="float32"))
    layers = [s.layer for s in lm.sites]
    assert layers == [1, 3, 5, 7]  # encoder blocks 1 and 3, decoder blocks 1 and 3 (after the 4 encoder ones)
    assert [s.name for s in lm.sites][::2] == [
        "encoder.block.1.layer.1.mlp.experts",
        "decoder.block.1.layer.2.mlp.experts",
    ]
    one = max(lm.store.get(s.layer, 0).nbytes for s in lm.sites)
    budgeted = load(folder, LoadOptions(dtype="float32", expert_memory=one))
    result = generate(budgeted, PROMPT, SamplingParams(max_tokens=TOKENS, ignore_eos=True))
    assert result.tokens == want
    missed = {layer for layer, s in result.stats.experts.layers.items() if s.misses}
    assert missed == set(layers)  # every sparse layer, encoder and decoder, read its experts on demand


def test_a_checkpoint_without_the_tied_copies_loads_the_same(released, tmp_path):
    folder, _, want = released
    from safetensors.torch import load_file

    tensors = {k: v for k, v in load_file(folder / "model.safetensors").items() if k not in TIED}
    lean = write_folder(tmp_path / "lean", TINY, tensors)
    lm = load(lean, LoadOptions(dtype="float32"))
    assert generate(lm, PROMPT, SamplingParams(max_tokens=TOKENS, ignore_eos=True)).tokens == want


def test_transformers_loads_the_folder_into_the_adapted_class(released):
    """The adapted class's checkpoint conversion fuses the released per-expert tensors exactly."""
    from moe_local.models.switch import SwitchForConditionalGeneration, register_switch

    folder, _, want = released
    register_switch()
    model = SwitchForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    assert oracle_greedy(model) == want
    again = SwitchTransformersForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    assert oracle_greedy(again) == want  # transformers' own class still loads its checkpoints


def test_text_prompt_and_generate_cli_print_the_decoders_output(released, capsys):
    folder, oracle, _ = released
    lm = load(folder, LoadOptions(dtype="float32"))
    ids = lm.tokenizer.encode("hello")
    want = oracle_greedy(oracle, ids, 8)
    result = generate(lm, "hello", SamplingParams(max_tokens=8, ignore_eos=True))
    assert result.tokens == want and result.text
    code, out, err = run_cli(
        capsys, "generate", str(folder), "hello", "-n", "8", "--dtype", "float32", "--expert-memory", "64KiB"
    )
    assert code == 0, err
    expected = generate(lm, "hello", SamplingParams(max_tokens=8)).text
    assert out == expected + "\n"


def test_serve_answers_completions_one_at_a_time_and_refuses_chat(released):
    from moe_local.server.app import create_app
    from moe_local.server.engine import Engine
    from moe_local.server.jobs import State

    folder, _, _ = released
    lm = load(folder, LoadOptions(dtype="float32"))
    assert "encoder-decoder" in (batch_support(lm) or "")
    want = [generate(lm, p, SamplingParams(max_tokens=6, ignore_eos=True)).text for p in ("hello", "a b c")]
    engine = Engine(folder, LoadOptions(dtype="float32"), parallel=4)  # falls back to one at a time
    engine.start()
    deadline = time.monotonic() + 60
    while engine.state is State.LOADING and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.state is State.READY, engine.error
    app = create_app(engine)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            body = {"model": engine.name, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            texts = await asyncio.gather(
                *(http.post("/v1/completions", json=body | {"prompt": p}) for p in ("hello", "a b c"))
            )
            messages = [{"role": "user", "content": "hello"}]
            chat = await http.post("/v1/chat/completions", json={"model": engine.name, "messages": messages})
            return [r.json() for r in texts], chat

    try:
        texts, chat = asyncio.run(main())
    finally:
        engine.stop()
    assert [t["choices"][0]["text"] for t in texts] == want
    assert chat.status_code == 400
    error = chat.json()["error"]
    assert error["code"] == "no_chat_template" and "\n" not in error["message"]
    assert "/v1/completions" in error["message"]


def test_chat_cli_refuses_in_one_line(released, capsys):
    folder, _, _ = released
    code, _, err = run_cli(capsys, "chat", str(folder))
    assert_one_line_error(code, err, "has no chat template")


def test_inspect_gives_switch_base_8_totals(tmp_path):
    """619M parameters, counted here from the released shapes (the tied copies once)."""
    folder = tmp_path / "switch-base-8"
    shapes = released_shapes(RELEASED)
    try:
        headers_only_checkpoint(folder, RELEASED, shapes)
    except OSError as exc:
        pytest.skip(f"this filesystem cannot hold a 1.2 GB sparse file: {exc}")
    make_tokenizer(chat_template=None).save_pretrained(folder)
    total = sum(torch.Size(s).numel() for k, s in shapes.items() if k not in TIED)
    one_expert = 2 * RELEASED["d_model"] * RELEASED["d_ff"]
    info = inspect_model(folder)
    assert info.family == "switch_transformers" and info.architecture == "SwitchForConditionalGeneration"
    assert info.moe_layers == 12 and info.experts_per_layer == 8 and info.top_k == 1
    assert info.layers == 24  # 12 encoder blocks and 12 decoder blocks
    assert info.total_params == total and 618e6 < total < 620e6
    assert info.active_params == total - 12 * 7 * one_expert
    assert json.loads((folder / "config.json").read_text()) == RELEASED


def test_a_size_field_out_of_range_is_one_line(tmp_path):
    folder = tmp_path / "huge"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY | {"num_layers": 10**7}))
    with pytest.raises(CheckpointError, match=r"num_layers = 10000000 must be an integer from 1 to 1024"):
        load_config(folder)


def test_quantize_cli_then_generate_with_a_tiny_expert_budget(released, tmp_path, capsys):
    folder, _, _ = released
    out = tmp_path / "q4"
    code, _, err = run_cli(capsys, "quantize", str(folder), str(out), "--recipe", "experts-4bit")
    assert code == 0, err
    q = load(out, LoadOptions(expert_memory=4096))
    assert len(q.sites) == 4 and q.store.budget_bytes == 4096
    result = generate(q, PROMPT, SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(result.tokens) == 6 and result.stats.experts.total.misses > 0
    code, text, err = run_cli(capsys, "generate", str(out), "hello", "-n", "6", "--expert-memory", "4KiB")
    assert code == 0, err
    assert text == generate(q, "hello", SamplingParams(max_tokens=6)).text + "\n"


def test_teacher_forcing_routes_calibration_text_through_every_sparse_layer(released):
    """What GPTQ / imatrix calibration needs of an encoder-decoder: every site sees the tokens."""
    from moe_local.seq2seq import teacher_forced

    folder, oracle, _ = released
    lm = load(folder, LoadOptions(dtype="float32"))
    for site in lm.sites:
        lm.model.get_submodule(site.name).trace = []
    ids = torch.tensor([[*PROMPT, 10, 11, 12]])
    with torch.inference_mode():
        logits = teacher_forced(lm.model, ids).logits
        want = oracle(input_ids=ids, decoder_input_ids=oracle._shift_right(ids)).logits
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)  # float32 rounding: matmuls over other shapes
    assert all(lm.model.get_submodule(s.name).trace for s in lm.sites)


def test_the_tiny_switch_checkpoint_is_exact(tmp_path):
    """``python -m moe_local.tiny switch_transformers OUT``: transformers' own save, loaded exactly."""
    from moe_local.tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint("switch_transformers", tmp_path / "tiny")
    oracle = SwitchTransformersForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    lm = load(folder, LoadOptions(dtype="float32"))
    assert len(lm.sites) == 4 and not lm.tokenizer.chat_template
    assert generate(lm, PROMPT, SamplingParams(max_tokens=TOKENS, ignore_eos=True)).tokens == oracle_greedy(
        oracle
    )


def test_dense_feed_forwards_and_attention_quantized_too(released, tmp_path):
    """A recipe that quantizes every linear but routers and embeddings: the copy still generates."""
    from moe_local.convert.writer import quantize_checkpoint
    from moe_local.recipes import load_recipe

    folder, _, _ = released
    recipe = tmp_path / "all.toml"
    rules = [("*.experts.*", "int4-g16-hqq"), ("*.mlp.w*", "int8-g16"), ("*Attention.*", "int8-g16")]
    recipe.write_text(
        'description = "every linear"\n'
        + "".join(f'[[rule]]\nmatch = "{m}"\nscheme = "{q}"\n' for m, q in rules)
        + '[[rule]]\nmatch = "*"\nscheme = "keep"\n'
    )
    out = tmp_path / "all"
    report = quantize_checkpoint(folder, out, load_recipe(str(recipe)))
    assert {"int8-g16"} <= set(report.rows)
    q = load(out, LoadOptions(expert_memory=4096))
    result = generate(q, PROMPT, SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(result.tokens) == 6 and all(0 <= t < TINY["vocab_size"] for t in result.tokens)


def test_gptq_calibration_runs_through_encoder_and_decoder_and_eval_refuses(released, tmp_path, capsys):
    """Calibration teacher-forces each window (every sparse layer sees it); eval is decoder-only."""
    folder, _, _ = released
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "gptq"
    args = ("quantize", str(folder), str(out), "--method", "gptq", "--calibration", str(text))
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    result = generate(load(out), PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(result.tokens) == 4
    code, _, err = run_cli(capsys, "eval", str(folder), "--text", str(text))
    assert_one_line_error(code, err, "switch_transformers is an encoder-decoder")


def test_synth_like_switch_base_8_cuts_both_stacks_and_generates(tmp_path, capsys):
    """``synth --like switch-base-8 --layers 2``: one sparse block per stack, offloaded and decoding."""
    out = tmp_path / "sw8"
    code, _, err = run_cli(capsys, "synth", "--like", "switch-base-8", "--layers", "2", str(out))
    assert code == 0, err
    info = inspect_model(out)
    assert info.family == "switch_transformers" and info.layers == 4 and info.moe_layers == 2
    lm = load(out, LoadOptions(expert_memory=8 << 20))
    result = generate(lm, "hello", SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(result.tokens) == 3 and result.stats.experts.total.misses > 0
