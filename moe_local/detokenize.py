"""Incremental detokenization: each new token costs a decode of a few tokens, not of the whole reply.

Decoding the whole reply again at every token is quadratic in its length. ``IncrementalDecoder``
keeps a short window instead (the prefix-offset scheme vLLM and TGI use, and the one
``tokenizers.decoders.DecodeStream`` runs in Rust): it decodes the tokens since the last piece of
text it gave out, together with the tokens of that piece (their text is the *prefix*), and gives
out what the window's text adds to the prefix's, once it does not end in an incomplete UTF-8
character. The prefix carries the context decoders need at a token boundary (SentencePiece's
leading-space strip, byte-fallback runs, byte-level BPE bytes split across tokens), so the pieces
join into the text a full decode gives.

With a fast tokenizer, no tokenization-space clean-up, and a ``tokenizers`` that has
``DecodeStream``, the Rust stream does the work; otherwise (or if the stream reports a window
whose text does not extend its prefix) the same scheme runs here over ``tokenizer.decode``.

transformers' clean-up (``clean_up_tokenization_spaces``: " ." -> ".", " 's" -> "'s", ...; only
non-BPE tokenizers) is applied to the raw stream here: it only deletes spaces a few characters
before the end of the match, so the clean text is final but for its last few characters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_INCOMPLETE = "\ufffd"  # what a decoder writes for bytes that do not (yet) form a character
# transformers' clean-up deletes the space its patterns start with; they span at most 4 characters,
# 6 with the one chain its order makes (" n ' t": " ' " -> "'", then " n't" -> "n't")
_CLEANUP_REACH = 6


def _cleans_up(tokenizer: Any) -> bool:
    """Whether ``tokenizer.decode`` rewrites spaces after decoding (which the Rust stream does not do).

    transformers 5 skips the clean-up for BPE models unless forced; a flag that is set is taken at
    its word otherwise, so the exact path (``tokenizer.decode`` on windows) is used.
    """
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    forced = getattr(
        tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False
    )
    return type(model).__name__ != "BPE" or bool(forced)


def _decode_stream(skip_special_tokens: bool) -> Any | None:
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers before 0.21
        return None
    return DecodeStream(skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turn tokens into text one at a time, at a cost independent of the reply's length.

    Args:
        tokenizer: a transformers tokenizer (fast or not).
        skip_special_tokens: leave special tokens out of the text, as ``decode`` does.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend
        self._stream = None
        self._cleanup = _cleans_up(tokenizer)
        if backend is not None and not self._cleanup:
            self._stream = _decode_stream(skip_special_tokens)
        self._raw = ""  # clean-up only: raw text since a point no clean-up pattern spans
        self._shown = 0  # clean-up only: characters of the clean ``_raw`` already given out
        # the window: ``_ids[:_read]`` is the prefix (the last piece given out), the rest is unread
        self._ids: list[int] = []
        self._read = 0
        self._prefix_text: str | None = ""  # None: not decoded since the window moved

    @property
    def uses_decode_stream(self) -> bool:
        """True while the Rust ``DecodeStream`` does the decoding."""
        return self._stream is not None

    def step(self, token: int) -> str:
        """Add one token.

        Returns:
            The text it completes: "" while a character is incomplete, or for a skipped special token.
        """
        piece = self._raw_step(token)
        return self._clean(piece) if self._cleanup else piece

    def flush(self) -> str:
        """The text held back at the end (clean-up's last characters; never an incomplete character)."""
        if not self._cleanup:
            return ""
        out = self._tokenizer.clean_up_tokenization(self._raw)[self._shown :]
        self._raw, self._shown = "", 0
        return out

    def _clean(self, piece: str) -> str:
        if not piece:
            return ""
        self._raw += piece
        clean = self._tokenizer.clean_up_tokenization(self._raw)
        upto = len(clean) - _CLEANUP_REACH  # a later character may still delete a space in the tail
        out = clean[self._shown : upto] if upto > self._shown else ""
        self._shown += len(out)
        # forget the raw text before the last point no pattern can span (no space in the
        # ``_CLEANUP_REACH`` characters before it) once its clean text is given out: bounded work
        raw = self._raw
        for cut in range(len(raw) - _CLEANUP_REACH, _CLEANUP_REACH - 1, -1):
            if " " not in raw[cut - _CLEANUP_REACH : cut]:
                head = len(self._tokenizer.clean_up_tokenization(raw[:cut]))
                if head <= self._shown:
                    self._raw, self._shown = raw[cut:], self._shown - head
                break
        return out

    def _raw_step(self, token: int) -> str:
        self._ids.append(token)
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, token)
            except Exception:  # the stream found a window whose text does not extend its prefix
                self._stream = None
            else:
                if piece:  # None or "": nothing new yet
                    self._advance()
                return piece or ""
        return self._window_step()

    def _window_step(self) -> str:
        decode = self._decoder()
        if self._prefix_text is None:
            self._prefix_text = decode(self._ids[: self._read])
        text = decode(self._ids)
        if len(text) <= len(self._prefix_text) or text.endswith(_INCOMPLETE):
            return ""
        # a decoder whose window text does not extend the prefix (rare): the new tail, as vLLM does
        piece = text[len(self._prefix_text) :]
        self._advance()  # the new prefix is decoded on its own next time (a window's start may differ)
        return piece

    def _advance(self) -> None:
        """The unread tokens became the last piece: they are the next window's prefix."""
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = None

    def _decoder(self) -> Callable[[list[int]], str]:
        tok, skip = self._tokenizer, self._skip
        if self._cleanup:  # raw windows: the clean-up runs over the joined stream (``_clean``)
            return lambda ids: (
                tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False) if ids else ""
            )
        return lambda ids: tok.decode(ids, skip_special_tokens=skip) if ids else ""
