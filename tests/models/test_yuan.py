"""Yuan 2.0-M32: exact against the published equations, incremental = full, loaded by moe-local.

The oracle below is written from the reference forward (IEIT-Yuan/Yuan2.0-M32's
``yuan_moe_hf_model.py``) in plain torch, apart from the package: it takes only config values
and the checkpoint's tensors. The tiny checkpoint has the released layout: config.json keys and
tensor names as ``IEITYuan/Yuan2-M32-hf`` has them (with its ``auto_map`` and a modeling file that
must never be imported).
"""

from __future__ import annotations

import json
import math
import struct
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_local.config import LoadOptions, SamplingParams
from moe_local.generation import generate
from moe_local.inspection import inspect_model
from moe_local.loading.loader import load
from moe_local.models import register_families
from moe_local.models.yuan import YuanCache, YuanConfig, YuanForCausalLM
from moe_local.tiny import make_tokenizer

# config.json of IEITYuan/Yuan2-M32-hf as released (the model's real dimensions).
RELEASED = {
    "_from_model_config": True,
    "architectures": ["YuanForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_yuan.YuanConfig",
        "AutoModelForCausalLM": "yuan_hf_model.YuanForCausalLM",
    },
    "tokenizer_class": "YuanTokenizer",
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 4096,
    "model_type": "yuan",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "rms_norm_eps": 1e-06,
    "dropout": 0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.30.0.dev0",
    "use_cache": True,
    "causal_mask": True,
    "use_flash_attention": True,
    "reset_attention_mask": True,
    "reset_position_ids": True,
    "use_loss_mask": False,
    "eod_token": 77185,
    "sep_token": 77187,
    "eod_token_id": 77185,
    "sep_token_id": 77185,
    "pad_token_id": 77185,
    "bos_token_id": 77185,
    "eos_token_id": 77185,
    "mask_token_id": 77185,
    "vocab_size": 135040,
    "attention_projection_size": 4096,
    "moe_config": {
        "moe_num_experts": 32,
        "moe_top_k": 2,
        "norm_topk_prob": True,
        "ffn_hidden_size": 8192,
        "gated_linear_unit": True,
    },
}
# The same layout, tiny: 2 heads of 32 over hidden 32, so RoPE covers half of each head
# (hidden // heads = 16 of 32) as in the release (128 of 256).
TINY = {
    **RELEASED,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 272,  # the test tokenizer's 261 tokens fit
    "attention_projection_size": 64,
    "max_position_embeddings": 64,
    "eod_token": 3,
    "sep_token": 4,
    "eod_token_id": 3,
    "sep_token_id": 3,
    "pad_token_id": 2,
    "bos_token_id": 1,
    "eos_token_id": 3,
    "mask_token_id": 3,
    "moe_config": {**RELEASED["moe_config"], "moe_num_experts": 4, "ffn_hidden_size": 24},
}
PROMPT = [5, 17, 42, 8, 60, 9, 33]


def _needs_fused_per_expert_keys() -> None:
    """Skip until moe-local's expert readers take a fused [gate; up] tensor per expert.

    The released ``experts.{e}.w1`` is renamed ``gate_up_proj`` on load (``yuan.CONVERSION``);
    ``moe_local.format.expert_keys.PART_OF_PROJ`` must map that name (see the change requested
    with this module).
    """
    from moe_local.format.expert_keys import PART_OF_PROJ

    if PART_OF_PROJ.get("gate_up_proj") != "gate_up":
        pytest.skip("moe-local's expert readers do not take per-expert gate_up_proj tensors yet")


TOKENS = 10


def released_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the released names and shapes (embeddings tied: no lm_head)."""
    g = torch.Generator().manual_seed(seed)
    h, e = cfg["hidden_size"], cfg["moe_config"]["moe_num_experts"]
    i, proj = cfg["moe_config"]["ffn_hidden_size"], cfg["attention_projection_size"]

    def rnd(*shape, std=0.2):
        return (torch.randn(*shape, generator=g) * std).to(torch.float32)

    t = {"model.embed_tokens.weight": rnd(cfg["vocab_size"], h, std=0.5), "model.norm.weight": 1 + rnd(h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t[p + "input_layernorm.weight"] = 1 + rnd(h)
        t[p + "post_attention_layernorm.weight"] = 1 + rnd(h)
        for name in ("q_proj", "k_proj", "v_proj"):
            t[p + f"self_attn.{name}.weight"] = rnd(proj, h)
        t[p + "self_attn.o_proj.weight"] = rnd(h, proj)
        t[p + "self_attn.lf_gate.conv1.weight"] = rnd(h // 2, h, 2, 1)
        t[p + "self_attn.lf_gate.conv1.bias"] = rnd(h // 2)
        t[p + "self_attn.lf_gate.conv2.weight"] = rnd(h, h // 2, 2, 1)
        t[p + "self_attn.lf_gate.conv2.bias"] = rnd(h)
        t[p + "self_attn.lf_gate.output_layernorm.weight"] = 1 + rnd(h)
        for name in ("query", "key", "value"):
            t[p + f"mlp.gate.{name}.weight"] = rnd(e, h, std=1.0)
        for x in range(e):
            t[p + f"mlp.experts.{x}.w1.weight"] = rnd(2 * i, h)
            t[p + f"mlp.experts.{x}.w2.weight"] = rnd(h, i)
    return t


def write_released(folder, cfg: dict = TINY, seed: int = 0):
    """A folder as the hub has it: config.json, safetensors, a tokenizer and the remote code."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file(released_tensors(cfg, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    # the release's own code: importing it would record the fact; moe-local must never do so
    trap = "import sys\nsys.modules['yuan_remote_code_was_imported'] = sys\n"
    (folder / "yuan_hf_model.py").write_text(trap)
    (folder / "configuration_yuan.py").write_text(trap)
    make_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- the oracle (published equations)


def _rms(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _causal_tap(x, w, b):
    """y[t] = w[..., 0] x[t-1] + w[..., 1] x[t] + b with x[-1] = 0; x [S, C_in], w [C_out, C_in, 2, 1]."""
    prev = torch.cat([torch.zeros_like(x[:1]), x[:-1]])
    return prev @ w[:, :, 0, 0].t() + x @ w[:, :, 1, 0].t() + b


def _rope_tables(n: int, dim: int):
    """The reference's tables: inverse frequencies, positions and angles all in bfloat16."""
    inv = (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).to(torch.bfloat16)
    pos = torch.tensor([float(p) for p in range(n)]).to(torch.bfloat16)
    ang = (pos.float()[:, None] * inv.float()[None]).to(torch.bfloat16)  # one product, rounded
    ang = torch.cat([ang, ang], -1)
    return ang.cos().float(), ang.sin().float()


def oracle_logits(w: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    """Logits [S, V] of the whole sequence ``ids``, recomputed from scratch."""
    h, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["rms_norm_eps"]
    d = cfg["attention_projection_size"] // heads
    rot = h // heads
    moe = cfg["moe_config"]
    s = len(ids)
    cos, sin = _rope_tables(s, rot)
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        a = _rms(x, w[p + "input_layernorm.weight"], eps)
        lf = p + "self_attn.lf_gate."
        mid = _causal_tap(a, w[lf + "conv1.weight"], w[lf + "conv1.bias"])
        filt = _rms(
            _causal_tap(mid, w[lf + "conv2.weight"], w[lf + "conv2.bias"]) + a,
            w[lf + "output_layernorm.weight"],
            1e-6,
        )
        q_all = filt @ w[p + "self_attn.q_proj.weight"].t()
        k_all = filt @ w[p + "self_attn.k_proj.weight"].t()
        v = (a @ w[p + "self_attn.v_proj.weight"].t()).view(s, heads, d)
        both = torch.cat([q_all, k_all], -1)  # head j: q = both[2dj : 2dj+d], k = the next d
        q = torch.stack([both[:, 2 * d * j : 2 * d * j + d] for j in range(heads)], 1)
        k = torch.stack([both[:, 2 * d * j + d : 2 * d * (j + 1)] for j in range(heads)], 1)

        def rope(t):
            r, rest = t[..., :rot], t[..., rot:]
            half = torch.cat([-r[..., rot // 2 :], r[..., : rot // 2]], -1)
            return torch.cat([r * cos[:, None] + half * sin[:, None], rest], -1)

        q, k = rope(q), rope(k)
        out = torch.zeros(s, heads, d)
        for j in range(heads):
            score = (q[:, j] @ k[:, j].t()) / math.sqrt(d)
            score = score.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
            out[:, j] = torch.softmax(score, -1) @ v[:, j]
        x = x + out.reshape(s, heads * d) @ w[p + "self_attn.o_proj.weight"].t()
        m = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        y = torch.zeros_like(m)
        for t in range(s):
            qr, kr, vr = (m[t] @ w[p + f"mlp.gate.{nm}.weight"].t() for nm in ("query", "key", "value"))
            logits = torch.stack([(torch.softmax(qr[i] * kr, -1) * vr).sum() for i in range(len(qr))])
            prob = torch.softmax(logits, -1)
            top = torch.topk(prob, moe["moe_top_k"])
            weights = top.values / top.values.sum() if moe["norm_topk_prob"] else top.values
            for wt, e in zip(weights.tolist(), top.indices.tolist(), strict=True):
                w1 = w[p + f"mlp.experts.{e}.w1.weight"]
                g, u = (m[t] @ w1.t()).chunk(2)
                y[t] += wt * ((torch.nn.functional.silu(g) * u) @ w[p + f"mlp.experts.{e}.w2.weight"].t())
        x = x + y
    x = _rms(x, w["model.norm.weight"], eps)
    return x @ w["model.embed_tokens.weight"].t()


def oracle_greedy(w: dict, cfg: dict, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(oracle_logits(w, cfg, ids)[-1].argmax()))
    return ids[len(prompt) :]


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    register_families()
    return write_released(tmp_path_factory.mktemp("yuan") / "tiny")


@pytest.fixture(scope="module")
def model(released):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(released, dtype=torch.float32, trust_remote_code=False).eval()


@pytest.fixture(scope="module")
def want(released):
    return oracle_greedy(load_file(str(released / "model.safetensors")), TINY, PROMPT, TOKENS)


def test_released_config_reads_as_is(released):
    config = YuanConfig.from_pretrained(released)
    assert (config.num_local_experts, config.num_experts_per_tok, config.head_dim) == (4, 2, 32)
    assert config.moe_config == TINY["moe_config"]
    saved = config.to_dict()
    assert "num_local_experts" not in saved and saved["moe_config"] == TINY["moe_config"]
    fields = {k: v for k, v in TINY.items() if k != "model_type"}
    spelled = YuanConfig(**fields, num_key_value_heads=2, head_dim=32)  # other spellings, consistent
    assert (spelled.attention_projection_size, spelled.num_key_value_heads) == (64, 2)
    spelled.num_experts_per_tok = 1
    assert spelled.moe_config["moe_top_k"] == 1


def test_transformers_load_is_the_oracle(model, released, want):
    assert isinstance(model, YuanForCausalLM)
    assert "yuan_remote_code_was_imported" not in sys.modules
    w = load_file(str(released / "model.safetensors"))
    with torch.no_grad():
        got = model(input_ids=torch.tensor([PROMPT]), use_cache=False).logits[0]
    torch.testing.assert_close(got, oracle_logits(w, TINY, PROMPT), rtol=1e-4, atol=1e-4)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        for _ in range(TOKENS):
            nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    assert ids[0, len(PROMPT) :].tolist() == want


def test_long_prompt_is_the_oracle(model, released):
    """Past position 256 the reference's bfloat16 positions round: the model must round alike."""
    w = load_file(str(released / "model.safetensors"))
    ids = torch.randint(0, TINY["vocab_size"], (300,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    want = oracle_logits(w, TINY, ids)
    # float32 sums over 300 keys in other orders differ by <1e-3; float32 RoPE would be off by ~10
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("chunks", [[7], [1, 6], [3, 1, 3], [2, 2, 2, 1]])
def test_incremental_equals_full(model, chunks):
    seq = [*PROMPT, 11, 12, 13, 14]
    with torch.no_grad():
        full = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
        cache, parts, at = None, [], 0
        for n in [*chunks, 1, 1, 1, 1]:  # prefill chunks, then decode steps
            out = model(input_ids=torch.tensor([seq[at : at + n]]), cache=cache, use_cache=True)
            cache, at = out.cache, at + n
            parts.append(out.logits[0])
    assert isinstance(cache, YuanCache) and cache.get_seq_length() == len(seq)
    steps = torch.cat(parts)
    # float32 rounding of other shapes only (the router and norms run in float32 by design)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)
    assert torch.equal(steps.argmax(-1), full.argmax(-1))


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1], [1, 4], [2, 3], [3, 1, 1]])
def test_convolution_state_continues_exactly(model, chunks):
    """The filter over chunks with YuanCache's state equals the filter over the whole.

    float64, but the RMSNorm computes in float32 as transformers' does: 1e-6 is its rounding; a
    wrong convolution state would be off by the size of the activations.
    """
    import copy

    lf = copy.deepcopy(model.model.layers[0].self_attn.lf_gate).double()
    x = torch.randn(
        2, sum(chunks), TINY["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    cache, parts, at = YuanCache(), [], 0
    with torch.no_grad():
        whole = lf(x, None)
        for n in chunks:
            part = x[:, at : at + n]
            parts.append(lf(part, cache.lf_update(0, part)))
            at += n
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "moe",
    [{"moe_num_experts": 0}, {**TINY["moe_config"], "gated_linear_unit": False}],
    ids=["dense", "no-glu"],
)
def test_variants_not_reproduced_are_refused(moe):
    from moe_local.errors import UnsupportedModelError

    fields = {k: v for k, v in TINY.items() if k not in ("auto_map", "architectures", "model_type")}
    with pytest.raises(UnsupportedModelError) as info:
        YuanForCausalLM(YuanConfig(**{**fields, "moe_config": moe}))
    assert "\n" not in str(info.value)


def test_prefetch_reads_no_linear_router(model):
    """``mlp.gate.query.weight`` is [E, H] but not a linear router: no next-layer guess is made."""
    from moe_local.loading.families import router_of

    block = model.model.layers[0].mlp
    assert router_of(block, TINY["moe_config"]["moe_num_experts"], TINY["hidden_size"]) == (None, None)


def test_rope_rounds_positions_as_the_reference(released):
    from moe_local.models.yuan import yuan_rope

    pos = torch.arange(600)[None]
    cos, sin = yuan_rope(pos, 16, torch.float32, in_bf16=True)
    ref_cos, ref_sin = _rope_tables(600, 16)
    assert torch.equal(cos[0], ref_cos) and torch.equal(sin[0], ref_sin)
    assert torch.equal(cos[0, 257], cos[0, 256])  # bfloat16 positions: 257 rounds to 256
    exact, _ = yuan_rope(pos, 16, torch.float32, in_bf16=False)
    assert not torch.equal(exact[0, 257], exact[0, 256])


def test_moe_local_loads_it_exactly(released, want):
    _needs_fused_per_expert_keys()
    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True)
    lm = load(released, LoadOptions(dtype="float32"))
    assert "yuan_remote_code_was_imported" not in sys.modules
    assert generate(lm, PROMPT, params).tokens == want
    assert len(lm.sites) == TINY["num_hidden_layers"]
    one = max(lm.store.get(s.layer, 0).nbytes for s in lm.sites)
    budgeted = load(released, LoadOptions(dtype="float32", expert_memory=one))
    assert generate(budgeted, PROMPT, params).tokens == want
    assert budgeted.store.stats().total.misses > 0


def test_quantized_copy_generates(released, tmp_path):
    _needs_fused_per_expert_keys()
    from moe_local.convert.writer import quantize_checkpoint
    from moe_local.recipes import load_recipe

    out = tmp_path / "q"
    quantize_checkpoint(released, out, load_recipe("experts-4bit"))
    lm = load(out)
    result = generate(lm, PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(result.tokens) == 4 and all(0 <= t < TINY["vocab_size"] for t in result.tokens)


def _headers_only_checkpoint(folder, cfg: dict) -> None:
    """config.json and a sparse safetensors file with every released tensor's header, no data."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    h, e = cfg["hidden_size"], cfg["moe_config"]["moe_num_experts"]
    i, proj, v = cfg["moe_config"]["ffn_hidden_size"], cfg["attention_projection_size"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h]}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h]}
        shapes |= {p + f"self_attn.{x}_proj.weight": [proj, h] for x in "qkv"}
        shapes |= {p + "self_attn.o_proj.weight": [h, proj]}
        lf = p + "self_attn.lf_gate."
        shapes |= {lf + "conv1.weight": [h // 2, h, 2, 1], lf + "conv1.bias": [h // 2]}
        shapes |= {lf + "conv2.weight": [h, h // 2, 2, 1], lf + "conv2.bias": [h]}
        shapes |= {lf + "output_layernorm.weight": [h]}
        shapes |= {p + f"mlp.gate.{x}.weight": [e, h] for x in ("query", "key", "value")}
        for x in range(e):
            shapes |= {p + f"mlp.experts.{x}.w1.weight": [2 * i, h], p + f"mlp.experts.{x}.w2.weight": [h, i]}
    header, at = {}, 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [at, at + size]}
        at += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + at)  # sparse: ~80 GB of size, no blocks written


def test_inspect_gives_the_released_totals(tmp_path):
    _needs_fused_per_expert_keys()
    register_families()
    folder = tmp_path / "m32"
    try:
        _headers_only_checkpoint(folder, RELEASED)
    except OSError as exc:
        pytest.skip(f"this filesystem cannot hold an 80 GB sparse file: {exc}")
    info = inspect_model(folder)
    assert info.family == "yuan" and info.experts_per_layer == 32 and info.top_k == 2
    assert info.moe_layers == 24
    assert 39.5e9 < info.total_params < 40.5e9, info.total_params
    assert 3.6e9 < info.active_params < 3.8e9, info.active_params
