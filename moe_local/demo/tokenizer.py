"""The SmolLM2 tokenizer rebuilt from GGUF metadata: byte-level BPE, digits split one by one.

The GGUF names its pre-tokenizer ``smollm``: llama.cpp splits every digit on its own before the
GPT-2 byte-level regex, which is what SmolLM2's own ``tokenizer.json`` does with a ``Digits``
pre-tokenizer. The vocabulary is already spelled in the byte-level alphabet; the tokens the file
marks as control (``<|im_start|>``, ``<|im_end|>``, ...) become special tokens.
"""

from __future__ import annotations

from moe_local.demo.gguf_source import GgufModel
from moe_local.errors import MoeLocalError

_CONTROL = 3  # llama.cpp token type of special tokens


def build_tokenizer(gguf: GgufModel):
    """Build a transformers fast tokenizer (with the chat template) from the file's metadata.

    Args:
        gguf: the parsed SmolLM2 GGUF file.

    Returns:
        A ``PreTrainedTokenizerFast`` ready to ``save_pretrained``.

    Raises:
        MoeLocalError: the file describes a tokenizer other than SmolLM2's byte-level BPE.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    m = gguf.metadata
    if m.get("tokenizer.ggml.model") != "gpt2":
        raise MoeLocalError(
            f"the demo's GGUF has a {m.get('tokenizer.ggml.model')!r} tokenizer, not byte-level BPE"
        )
    tokens: list[str] = m["tokenizer.ggml.tokens"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(pair.split(" ", 1)) for pair in m["tokenizer.ggml.merges"]]
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    types = m.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    control = [t for t, k in zip(tokens, types, strict=True) if k == _CONTROL]
    special = [AddedToken(t, special=True, normalized=False) for t in control]
    tok.add_special_tokens(special)

    def token(key: str) -> str | None:
        index = m.get(f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None else None

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        add_bos_token=bool(m.get("tokenizer.ggml.add_bos_token", False)),
        clean_up_tokenization_spaces=False,
        model_max_length=int(m.get("llama.context_length", 8192)),
    )
    template = m.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast
