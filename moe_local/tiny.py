"""Tiny random checkpoints of every supported MoE family, for tests and trying the machinery.

Each is written the way ``save_pretrained`` writes real checkpoints (per-expert or fused
expert tensors as the family stores them) with a small byte-level BPE tokenizer and a chat
template, so it goes through exactly the loading path real models take.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from moe_local.errors import MoeLocalError

VOCAB = 320
MAX_PARAMETERS = 100_000_000  # tiny ones have under a million (tests size some up); 5e9 were seen unshrunk
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
    tie_word_embeddings=False,
)
_DEEPSEEK = dict(
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    n_shared_experts=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    n_group=2,
    topk_group=1,
    num_hidden_layers=3,
    rope_scaling=None,
)
FAMILIES: dict[str, dict] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v2": dict(_DEEPSEEK, q_lora_rank=None, topk_method="group_limited_greedy"),
    "deepseek_v3": dict(_DEEPSEEK, q_lora_rank=16),
    "gpt_oss": dict(
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
    ),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
}
# Families moe-local defines itself (``moe_local.models``), with tiny sizes of their own fields.
OWN_FAMILIES: dict[str, dict] = {
    "deepseek": dict(
        n_routed_experts=4,
        n_shared_experts=2,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        num_key_value_heads=4,
    ),
    "skywork_moe": dict(
        num_experts=[4], num_experts_per_tok=2, moe_use_logits_norm=True, moe_feature_no_mul_topk=True
    ),
    "grok-1": dict(num_experts=4, num_experts_per_tok=2, tie_word_embeddings=True),
}
# Encoder-decoder families (Switch Transformers: transformers' own class, no chat template).
ENCODER_DECODER: dict[str, dict] = {
    "switch_transformers": dict(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_heads=4,
        num_layers=4,
        num_decoder_layers=4,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2,
        num_experts=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=258,
        eos_token_id=257,
        decoder_start_token_id=258,
    ),
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(family: str, **overrides):
    """Return a tiny transformers config of ``family``.

    The tested families (``FAMILIES``) have hand-picked sizes; any other model type of the installed
    transformers gets its defaults shrunk by ``shrunk_config_fields``.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from moe_local.models import register_families

    register_families()  # moe-local's own families (moe_local.models) are model types too
    if family in OWN_FAMILIES:
        return AutoConfig.for_model(family, **{**_COMMON, **OWN_FAMILIES[family], **overrides})
    if family in ENCODER_DECODER:
        return AutoConfig.for_model(family, **{**ENCODER_DECODER[family], **overrides})
    if family in FAMILIES:
        return AutoConfig.for_model(family, **{**_COMMON, **FAMILIES[family], **overrides})
    if family not in CONFIG_MAPPING:
        raise MoeLocalError(f"no tiny config for {family!r}: this transformers does not define it")
    cls = CONFIG_MAPPING[family]
    fields = shrunk_config_fields(cls().to_dict())
    for k, v in FAMILY_FIELDS.get(family, {}).items():  # a sub-config's fields join its shrunk ones
        fields[k] = {**fields[k], **v} if isinstance(v, dict) and isinstance(fields.get(k), dict) else v
    return cls(**{**fields, **overrides})


# Gemma 4's per-layer input embeddings (262144 x 256 by default)
_GEMMA4_TEXT = dict(vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8)
# Qwen4-exp's indexed attention: its sizes are None by default
_QWEN4_TEXT = dict(
    indexer_n_heads=2,
    indexer_kv_heads=1,
    indexer_head_dim=8,
    indexer_budget=8,
    indexer_compress_ratio=2,
    hc_lowrank=8,
)
# Families whose sizes live in fields of their own (or whose defaults transformers' own model cannot
# run at tiny sizes): set on top of ``shrunk_config_fields``, each with why.
FAMILY_FIELDS: dict[str, dict] = {
    # sizes under its own names and nested configs; transformers 5.24's attention reads
    # ``attn_config.rope_theta``, which the config class no longer defines, and clamps by
    # ``clip_qkv`` even when it is None (the released config.json files set both)
    "dbrx": dict(
        d_model=32,
        n_heads=4,
        n_layers=2,
        max_seq_len=256,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(hidden_size=32, ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2),
    ),
    "hunyuan_v1_moe": dict(head_dim=8),  # None by default: its attention scales by head_dim**-0.5
    # mamba heads must divide expand * hidden size
    "granitemoehybrid": dict(
        mamba_n_heads=8,
        mamba_d_head=8,
        mamba_d_state=16,
        mamba_chunk_size=16,
        layer_types=["linear_attention", "full_attention"],  # all mamba by default: no attention cache
    ),
    # attention every 2nd layer (every 8th by default: 2 layers would have none) and experts too
    "jamba": dict(
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_dt_rank=8,
        mamba_d_state=8,
        use_mamba_kernels=False,
    ),
    # its first num_dense_layers layers have no experts; layer_types is required (None by default)
    "lfm2_moe": dict(num_hidden_layers=3, num_dense_layers=1, layer_types=["conv", "full_attention", "conv"]),
    "gemma4_text": _GEMMA4_TEXT,
    "gemma4": dict(text_config=_GEMMA4_TEXT),
    "qwen4_exp_text": _QWEN4_TEXT,
    "qwen4_exp": dict(text_config=_QWEN4_TEXT),
    # its adapters must end at the text width (its causal LM builds the text model only)
    "dots3_note": dict(vision_config=dict(adapter_out_dim=32), audio_config=dict(adapter_out_dim=32)),
    "zaya": dict(num_experts_per_tok=1, router_hidden_size=16),  # its router takes one expert only
    "inkling2_text": dict(unpadded_vocab_size=VOCAB),  # the padded vocabulary's real part
    "inkling2_loop_text": dict(unpadded_vocab_size=VOCAB),
    "longcat_flash": dict(num_layers=2, zero_expert_num=2),  # its own layer count field
}


# Size fields set on any family's defaults (where the family has them) to make a tiny model.
_SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "expert_ffn_hidden_size": 16,
    "ffn_hidden_size": 64,
    "shared_expert_intermediate_size": 32,
    "shared_experts_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "dense_intermediate_size": 64,
    "intermediate_size_mlp": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 256,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "num_experts_per_token": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "top_k_experts": 2,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "o_lora_rank": 16,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "qk_head_dim": 8,
    "v_head_dim": 8,
    "n_group": 2,
    "topk_group": 1,
    "num_expert_group": 2,
    "index_head_dim": 8,
    "index_n_heads": 2,
    "index_topk": 8,
    "sliding_window": 16,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 8,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_head_dim": 8,
    "linear_num_heads": 4,
    "first_k_dense_replace": 1,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 258,
}


_MOE_SWITCHES = (
    "enable_moe_block",
    "num_experts",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "top_k_experts",
    "moe_intermediate_size",
    "moe_topk",
)
# Fields equal in a family's defaults stay equal: multi-head latent attention has one key/value head
# per query head, and its rotary part is the head_dim the rotary embedding is sized by.
_TIES = (("num_key_value_heads", "num_attention_heads"), ("head_dim", "qk_rope_head_dim"))


def _small_sizes(defaults: dict) -> dict:
    """``_SMALL`` for every integer size field ``defaults`` has, fields tied in it kept tied."""
    out = {
        k: v
        for k, v in _SMALL.items()
        if isinstance(defaults.get(k), int) and not isinstance(defaults[k], bool)
    }
    for a, b in _TIES:
        if a in out and b in out and defaults[a] == defaults[b]:
            out[a] = out[b]
    return out


def shrunk_config_fields(defaults: dict) -> dict:
    """Fields that make a family's default config tiny: ``_SMALL`` sizes and a few layers.

    Per-layer lists (``layer_types``, ``mlp_layer_types``, ...) keep one layer of each kind they
    name, so a hybrid family keeps every kind of layer (and its MoE layers) in a few layers; a
    ``per_layer_config`` (layers sized apart) keeps the kept layers' entries, shrunk too. A
    multimodal wrapper's ``text_config`` (what its causal LM builds) is shrunk the same way.
    """
    out = _small_sizes(defaults)
    for k in _MOE_SWITCHES:  # families whose MoE block is off by default (Gemma 4): on, sized
        if k in defaults and defaults[k] in (None, False, 1):
            out[k] = True if k == "enable_moe_block" else _SMALL[k]
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in defaults and k not in out:
            out[k] = _SMALL[k]
    if isinstance(defaults.get("text_config"), dict):
        out["text_config"] = shrunk_config_fields(defaults["text_config"])
    n = defaults.get("num_hidden_layers")
    if not isinstance(n, int):
        return out
    lists = {k: v for k, v in defaults.items() if isinstance(v, list) and len(v) == n and n > 2}
    # a list of every layer's index (Llama 4's ``moe_layers``) names layers, not kinds of layer
    indices = {k for k, v in lists.items() if v == list(range(n))}
    keep = {0, 1} if n >= 2 else {0}
    for k, values in lists.items():
        if k in indices:
            continue
        first: dict[str, int] = {}
        for i, v in enumerate(values):
            first.setdefault(repr(v), i)
        keep |= set(first.values())
    layers = sorted(keep)
    out["num_hidden_layers"] = len(layers)
    for k, values in lists.items():
        out[k] = list(range(len(layers))) if k in indices else [values[i] for i in layers]
    per_layer = defaults.get("per_layer_config")
    if isinstance(per_layer, dict):  # keyed by layer index ("02"): the kept layers', renumbered
        by_index = {int(k): v for k, v in per_layer.items() if str(k).isdigit() and isinstance(v, dict)}
        out["per_layer_config"] = {
            str(j): {**v, **_small_sizes(v)} for j, i in enumerate(layers) if (v := by_index.get(i))
        }
    return out


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer over 256 bytes plus a few specials, with a chat template.

    Args:
        chat_template: the template (None: none, as Switch Transformers' tokenizer has none).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=chat_template,
    )
    return fast


def make_tiny_checkpoint(family: str, out: str | Path, *, seed: int = 0, **overrides) -> Path:
    """Write a tiny random checkpoint of ``family`` to ``out`` (config, safetensors, tokenizer).

    Args:
        family: a model_type from ``FAMILIES``, ``OWN_FAMILIES`` or ``ENCODER_DECODER`` (or any MoE
            type transformers defines).
        out: destination folder (created).
        seed: torch seed for the random weights.
        **overrides: config fields to change (e.g. ``num_hidden_layers=4``).

    Returns:
        The folder.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out)
    config = tiny_config(family, **overrides)
    if family in ENCODER_DECODER:
        from transformers import SwitchTransformersForConditionalGeneration

        build = SwitchTransformersForConditionalGeneration
    else:
        build = functools.partial(
            AutoModelForCausalLM.from_config, dtype=torch.float32, trust_remote_code=False
        )
    with torch.device("meta"):  # sizes first: a field left unshrunk must not fill the machine's RAM
        n = sum(p.numel() for p in build(config).parameters())
    if n > MAX_PARAMETERS:
        raise MoeLocalError(
            f"the tiny {family} would have {n / 1e6:.0f}M parameters (more than "
            f"{MAX_PARAMETERS / 1e6:.0f}M): its config has sizes moe_local.tiny does not shrink"
        )
    torch.manual_seed(seed)
    model = build(config)
    with torch.no_grad():  # larger weights than the default init make routing and logits decisive
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = config.get_text_config().eos_token_id  # a wrapper's is its text's
    model.save_pretrained(out)
    make_tokenizer(None if family in ENCODER_DECODER else CHAT_TEMPLATE).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m moe_local.tiny FAMILY OUT``: write a tiny random checkpoint to try the machinery."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m moe_local.tiny", description=main.__doc__)
    from moe_local.loading.families import moe_model_types

    known = {*FAMILIES, *OWN_FAMILIES, *ENCODER_DECODER, *moe_model_types()}
    parser.add_argument("family", choices=sorted(known))
    parser.add_argument("out")
    args = parser.parse_args(argv)
    print(make_tiny_checkpoint(args.family, args.out))


if __name__ == "__main__":
    main()
