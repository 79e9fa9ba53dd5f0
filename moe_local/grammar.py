"""Constrained decoding: a grammar (a JSON schema, any JSON, a tool call's syntax) as a logits mask.

The engine is llguidance (MIT), an optional dependency (``pip install moe-local[grammar]``). Three
maintained engines were compared for this job:

- **llguidance** (Microsoft, Rust; used by llama.cpp, vLLM and SGLang): one 3 MB wheel with no
  Python dependencies, MIT. It computes each token's mask lazily from a token trie and a lexer
  (no index over the vocabulary built ahead), so a new schema compiles in about 10 ms, and the
  whole mask step on a 49,152-token vocabulary takes 0.3-0.4 ms a token (median; 0.7-1.0 ms mean
  under random logits, the worst case) on one busy CPU core: 1-2% of the demo's ~70 ms decode step
  (``benchmarks/bench_grammar.py``). Lark grammars embed JSON schemas (``%json {...}``), which is
  exactly what a tool call needs: the template's call markers around arguments matching a schema.
- **xgrammar** (MLC, C++; vLLM's default): Apache-2.0 and fast once compiled, but its wheel
  requires torch, transformers, apache-tvm-ffi and, on Linux x86-64, triton (hundreds of MB),
  and it compiles each grammar ahead against the whole vocabulary. Not timed here: installing it
  would have pulled triton into a CPU-only environment for a per-token gain we do not need.
- **outlines-core** (dottxt, Rust): Apache-2.0, no dependencies, but it turns a schema into a
  regular expression and builds a full index over the vocabulary before the first token (5.9 s
  for the benchmark's nested schema on 49,152 tokens, against llguidance's 8 ms, at a similar
  per-token cost after), and has no grammar beyond regular languages.

So llguidance: lightest to install, cheapest per new request, per-token cost well under the
target, and a license that fits. Without it, ``available()`` is False and every constraint raises
``GrammarUnavailable`` (the server answers that as a one-line 400).

    compiler = GrammarCompiler(tokenizer, vocab_size=49152, eos_ids=[2])
    mask = compiler.processor(compiler.json_schema({"type": "object"}), prompt_len=12)
    logits = mask(tokens_so_far, logits)  # disallowed tokens at -inf
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from moe_local.errors import MoeLocalError

INSTALL_HINT = "pip install 'moe-local[grammar]' (it installs llguidance)"
# No whitespace of the model's choosing between JSON tokens: a random or weak model could
# otherwise spend its whole budget on newlines inside an object.
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarUnavailable(MoeLocalError):
    """Constrained decoding was asked for but the grammar engine (llguidance) is not installed."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} needs constrained decoding, which needs llguidance: {INSTALL_HINT}")


class GrammarError(MoeLocalError):
    """A schema or grammar the engine cannot compile, or a matcher that failed mid-generation."""


def available() -> bool:
    """Whether the grammar engine can be imported."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def json_grammar_of(schema: dict[str, Any] | None) -> str:
    """The Lark text ``%json {...}`` of a JSON schema (None: any JSON object), compact whitespace.

    Args:
        schema: a JSON schema, or None for ``{"type": "object"}``.

    Returns:
        A Lark expression to embed in a rule.
    """
    body = dict(schema) if schema else {"type": "object"}
    body["x-guidance"] = {**_JSON_OPTIONS, **(body.get("x-guidance") or {})}
    return "%json " + json.dumps(body)


def lark_literal(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text)


class GrammarCompiler:
    """Compiles grammars for one tokenizer and makes per-request mask processors.

    Building the engine's view of the tokenizer walks the whole vocabulary (about a second for a
    large one), so make one per model and keep it.

    Args:
        tokenizer: a fast transformers tokenizer.
        vocab_size: the model's logits width (may exceed the tokenizer's vocabulary: the extra
            rows are never allowed).
        eos_ids: tokens that end the generation; allowed only where the grammar is complete.

    Raises:
        GrammarUnavailable: llguidance is not installed.
        GrammarError: the tokenizer is not a fast tokenizer.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]) -> None:
        try:
            import llguidance
            import llguidance.hf
        except ImportError as exc:
            raise GrammarUnavailable("constrained decoding") from exc
        self._llg = llguidance
        self.vocab_size = int(vocab_size)
        eos = sorted(int(t) for t in eos_ids) or [tokenizer.eos_token_id]
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        except ValueError as exc:
            raise GrammarError(f"constrained decoding needs a fast tokenizer: {exc}") from exc

    def json_schema(self, schema: dict[str, Any] | None) -> str:
        """A grammar for JSON matching ``schema`` (None: any JSON object), checked.

        Raises:
            GrammarError: the schema cannot be compiled (named feature unsupported, invalid).
        """
        return self.lark(f"start: {json_grammar_of(schema)}")

    def lark(self, text: str) -> str:
        """A grammar from Lark text (``%json {...}`` embeds a JSON schema), checked.

        Raises:
            GrammarError: the grammar cannot be compiled.
        """
        grammar = self._llg.LLMatcher.grammar_from_lark(text)
        is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            first = (messages[0] if messages else "invalid grammar").strip().splitlines()[0][:300]
            raise GrammarError(f"the schema cannot be used for constrained decoding: {first}")
        return grammar

    def processor(self, grammar: str, prompt_len: int) -> GrammarMask:
        """A fresh mask processor for one generation of ``grammar``."""
        return GrammarMask(
            self._llg.LLMatcher(self.tokenizer, grammar, log_level=0), self.vocab_size, prompt_len
        )


class GrammarMask:
    """A logits processor that lets through only the tokens the grammar allows next.

    It follows the generation through the token list it is given (the prompt, then each token
    sampled), so it fits ``LogitsProcessor``'s signature: ``(tokens so far, logits) -> logits``.

    Args:
        matcher: an ``llguidance.LLMatcher`` at the grammar's start.
        vocab_size: the logits width.
        prompt_len: how many leading tokens are the prompt (not fed to the grammar).
    """

    def __init__(self, matcher: Any, vocab_size: int, prompt_len: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.fed = prompt_len

    def __call__(self, tokens: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """Advance over the tokens sampled since the last call, then mask ``logits`` [V]."""
        for token in tokens[self.fed :]:
            if not self.matcher.consume_token(int(token)):
                raise GrammarError(f"constrained decoding failed: {self.matcher.get_error()}")
        self.fed = len(tokens)
        allowed = self.allowed()
        width = logits.shape[-1]
        if width > allowed.shape[0]:
            allowed = torch.cat([allowed, torch.zeros(width - allowed.shape[0], dtype=torch.bool)])
        return logits.masked_fill(~allowed[:width], float("-inf"))

    def allowed(self) -> torch.Tensor:
        """The next-token mask as booleans [vocab_size]."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)
        if self.matcher.is_error():
            raise GrammarError(f"constrained decoding failed: {self.matcher.get_error()}")
        return torch.from_numpy(mask)

    def done(self) -> bool:
        """Whether the grammar is complete (only an end-of-sequence token may follow)."""
        return bool(self.matcher.is_stopped())
