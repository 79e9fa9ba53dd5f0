"""IncrementalDecoder and the generation detokenizer: the same text as a full decode, at linear cost."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from moe_local.detokenize import IncrementalDecoder
from moe_local.generation import _Detokenizer
from moe_local.tiny import make_tokenizer

# the demo's tokenizer, when this machine has built the demo (read before the tests move MOE_LOCAL_HOME)
_DEMO = Path(os.environ.get("MOE_LOCAL_HOME") or "~/.cache/moe-local").expanduser() / "demo"
_DEMO_TOKENIZERS = sorted(p.parent for p in _DEMO.glob("*/tokenizer.json"))

TEXTS = [
    "Once upon a time, a fox jumped over 12345 lazy dogs.",
    "naïve café — 東京 in 2024 🦊🎉, «quotes» and\ttabs\n\nnew lines",
    "  leading spaces and trailing  ",
    "z̵̢a͜l̷g̸o and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and a lone é",
]


def _spm_tokenizer():
    """A Llama/Mixtral-style SentencePiece BPE: ``▁`` spaces, byte fallback, leading-space strip."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyzOT,.0123456789", "▁a", "▁the", "▁fox", "on", "ce"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "a"), ("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("o", "n"), ("c", "e")]
    vocab.update({"▁t": len(vocab), "▁th": len(vocab) + 1})
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _wordpiece_tokenizer():
    """A BERT-style WordPiece with transformers' clean-up of spaces before punctuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "hello", "world", ",", ".", "!", "?", "it", "'", "s", "good", "##s", "do", "n", "t"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", clean_up_tokenization_spaces=True)


class _NotFast:
    """The tokenizer seen through ``decode`` only: forces the window scheme written in Python."""

    def __init__(self, tokenizer) -> None:
        self.decode = tokenizer.decode


TOKENIZERS = {"byte-level": make_tokenizer, "sentencepiece": _spm_tokenizer}


def _stream(decoder: IncrementalDecoder, ids: list[int]) -> str:
    return "".join(decoder.step(t) for t in ids) + decoder.flush()


def _full(tokenizer, ids: list[int]) -> str:
    """A full decode, less a trailing incomplete character (which the stream holds back)."""
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd") if ids else ""


def _id_sequences(tokenizer, random_ids: bool = True) -> list[list[int]]:
    """Encoded texts, with special tokens between them, random strings, and random ids.

    Random ids hold broken UTF-8. A SentencePiece byte-fallback decode is not prefix-stable there
    (a run of byte tokens that turns invalid becomes one U+FFFD per byte, valid bytes before it
    included), so no stream can match it: those tokenizers get valid text only.
    """
    rng = random.Random(0)
    pool = "abcdefghijklmnopqrstuvwxyz  ,.0123456789é東🦊\n"
    texts = [*TEXTS, *("".join(rng.choice(pool) for _ in range(120)) for _ in range(5))]
    seqs = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    eos = tokenizer.eos_token_id
    seqs.append([t for text in texts for t in [*tokenizer.encode(text, add_special_tokens=False), eos]])
    if random_ids:
        seqs += [[rng.randrange(len(tokenizer)) for _ in range(200)] for _ in range(5)]
    return seqs


@pytest.mark.parametrize("fast", [True, False], ids=["decode-stream", "window"])
@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_stream_equals_full_decode(name, fast):
    tok = TOKENIZERS[name]()
    assert tok.decode(tok.encode(TEXTS[1], add_special_tokens=False)) == TEXTS[1]  # nothing is <unk>
    for ids in _id_sequences(tok, random_ids=name == "byte-level"):
        decoder = IncrementalDecoder(tok if fast else _NotFast(tok))
        assert decoder.uses_decode_stream == fast
        assert _stream(decoder, ids) == _full(tok, ids)


def test_split_multibyte_characters_wait_for_their_last_byte():
    tok = make_tokenizer()
    ids = tok.encode("é🦊", add_special_tokens=False)  # one token per byte: 2 + 4 bytes
    assert len(ids) == 6
    for fast in (True, False):
        decoder = IncrementalDecoder(tok if fast else _NotFast(tok))
        assert [decoder.step(t) for t in ids] == ["", "é", "", "", "", "🦊"]


def test_sentencepiece_byte_fallback_and_leading_space():
    tok = _spm_tokenizer()
    ids = tok.encode("the fox é", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[-2:] == ["<0xC3>", "<0xA9>"]
    for fast in (True, False):
        decoder = IncrementalDecoder(tok if fast else _NotFast(tok))
        pieces = [decoder.step(t) for t in ids]
        assert pieces[0] == "the" and pieces[-2:] == ["", "é"] and "".join(pieces) == "the fox é"


def test_space_cleanup_uses_the_window_over_decode():
    tok = _wordpiece_tokenizer()
    rng = random.Random(1)
    words = ["hello", "world", ",", ".", "!", "?", "it", "'", "s", "goods", "do", "n", "t"]
    texts = ["hello , world . it ' s good !", *(" ".join(rng.choices(words, k=300)) for _ in range(5))]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        decoder = IncrementalDecoder(tok)
        assert not decoder.uses_decode_stream  # the Rust stream would not clean up
        assert _stream(decoder, ids) == tok.decode(ids)
        assert len(decoder._raw) < 40  # the text cleaned at each step stays short
    assert tok.decode(tok.encode(texts[0], add_special_tokens=False)) == "hello, world. it's good!"


@pytest.mark.skipif(not _DEMO_TOKENIZERS, reason="the demo model is not built on this machine")
def test_demo_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_DEMO_TOKENIZERS[0])
    for ids in _id_sequences(tok):
        for fast in (True, False):
            assert _stream(IncrementalDecoder(tok if fast else _NotFast(tok)), ids) == _full(tok, ids)


# ----------------------------------------------------------------------------- cost


def _counting(tokenizer) -> list[int]:
    """Count the tokens every decode hands to the tokenizer's decoder (the Rust stream's too)."""
    from tokenizers import decoders

    inner = tokenizer.backend_tokenizer.decoder
    seen: list[int] = []

    class Counting:
        def decode_chain(self, tokens: list[str]) -> list[str]:
            seen.append(len(tokens))
            return [inner.decode(tokens)]

    tokenizer.backend_tokenizer.decoder = decoders.Decoder.custom(Counting())
    return seen


@pytest.mark.parametrize("fast", [True, False], ids=["decode-stream", "window"])
@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_long_reply_costs_linear_decoding(name, fast):
    tok = TOKENIZERS[name]()
    text = " ".join(TEXTS) * 40
    ids = tok.encode(text, add_special_tokens=False)
    reference = tok.decode(ids)
    seen = _counting(tok)
    detok = _Detokenizer(tok if fast else _NotFast(tok), stop=["never in the text"])
    out = "".join(detok.add(t)[0] for t in ids) + detok.flush()
    assert out == reference
    n = len(ids)
    assert n > 2000
    # a few tokens per step (the window and its prefix); a full re-decode would pass n * (n + 1) / 2
    assert sum(seen) <= 6 * n, (sum(seen), n)
    assert max(seen) <= 16  # no decode grows with the reply


# ----------------------------------------------------------------------------- stop strings


def _run(stop: list[str], pieces: list[str]) -> tuple[list[str], bool, str]:
    """Feed ``pieces`` (one byte-level token per character) through a detokenizer with ``stop``."""
    tok = make_tokenizer()
    detok = _Detokenizer(tok, stop)
    shown = []
    for piece in pieces:
        for t in tok.encode(piece, add_special_tokens=False):
            text, stopped = detok.add(t)
            shown.append(text)
            if stopped:
                return shown, True, ""
    return shown, False, detok.flush()


def test_stop_string_across_tokens_is_cut_and_held_back():
    shown, stopped, _ = _run(["END"], ["abc", "E", "N", "D", "tail"])
    assert stopped and "".join(shown) == "abc"
    assert shown[-3:] == ["", "", ""]  # "E" and "EN" were held: they could start "END"


def test_partial_stop_string_is_flushed_at_the_end():
    shown, stopped, rest = _run(["END"], ["abcEN"])
    assert not stopped and "".join(shown) == "abc" and rest == "EN"


def test_earliest_stop_string_wins():
    shown, stopped, _ = _run(["xyz", "b"], ["axyzb"])
    assert stopped and "".join(shown) == "a"
    shown, stopped, _ = _run(["yz", "xy"], ["axyz"])
    assert stopped and "".join(shown) == "a"


def test_stop_inside_a_multibyte_piece():
    shown, stopped, _ = _run(["🦊"], ["fox: 🦊 done"])
    assert stopped and "".join(shown) == "fox: "
