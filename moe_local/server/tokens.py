"""One token's text and bytes, as OpenAI's logprobs report them.

Decoding a token alone loses what it really is when it holds part of a UTF-8 character (a
byte-level BPE piece such as ``0xE2``, or a SentencePiece ``<0xE2>`` byte-fallback token). This
maps a token to its exact bytes and to a text that is the bytes decoded when they are valid UTF-8,
and ``bytes:\\xe2`` (OpenAI's notation) when they are not.
"""

from __future__ import annotations

import re
from typing import Any

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPM_SPACE = "\u2581"


def byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable character -> the byte it stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class TokenPieces:
    """Token id -> (text, bytes), cached.

    Args:
        tokenizer: a transformers tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, bytes]] = {}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = type(getattr(backend, "decoder", None)).__name__
        self.byte_level = byte_level_table() if decoder == "ByteLevel" else None
        self.special = set(getattr(tokenizer, "all_special_ids", ()) or ())

    def piece(self, token: int) -> tuple[str, bytes]:
        """Return the token's text and exact bytes ("" and b"" for ids the tokenizer lacks)."""
        hit = self.cache.get(token)
        if hit is None:
            raw = self._bytes(token)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self.cache[token] = (text, raw)
        return hit

    def _bytes(self, token: int) -> bytes:
        name = self.tokenizer.convert_ids_to_tokens(token)
        if name is None:
            return b""
        if token in self.special:
            return name.encode("utf-8")
        if self.byte_level is not None and all(ch in self.byte_level for ch in name):
            return bytes(self.byte_level[ch] for ch in name)
        m = _BYTE_FALLBACK.match(name)
        if m:
            return bytes([int(m.group(1), 16)])
        if _SPM_SPACE in name:
            return name.replace(_SPM_SPACE, " ").encode("utf-8")
        return self.tokenizer.decode([token]).encode("utf-8")
