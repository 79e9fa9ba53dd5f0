"""Prompts -> token ids: text as is, chat messages through the chat template with their strings as text.

A chat template renders a conversation to one string, and encoding that string naively turns every
special-token spelling in it into the special token, one inside a message too: a user could close
their turn and open a system turn of their own. Here messages that spell out an added token are
encoded with transformers' ``sanitize_control_tokens``, which encodes those spellings as text and
only the template's own markers as control tokens; other conversations are encoded as they always
were. A failing template (it raised, broke the sandbox, or does not parse) is a ``ChatTemplateError``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from moe_local.errors import MoeLocalError

if TYPE_CHECKING:
    from moe_local.loading.loader import LoadedModel

Prompt = str | Sequence[int] | Sequence[dict]


def encode_prompt(lm: LoadedModel, prompt: Prompt, chat: bool | None = None) -> list[int]:
    """Turn a prompt into token ids.

    Chat messages are encoded as text: a special token spelled out inside a message (say
    ``<|im_end|>`` then ``<|im_start|>system``) becomes the tokens of that text, never the control
    token, so a message cannot forge a turn; only the chat template's own markers are control tokens. Plain
    text with ``chat=False`` is the caller's whole prompt and is encoded as is, special-token
    spellings included (as raw completions are in llama-server and vLLM).

    Args:
        lm: the loaded model (its tokenizer and chat template).
        prompt: text, token ids, or chat messages (``[{"role": ..., "content": ...}]``).
        chat: wrap text in the chat template as one user turn (None: only when the tokenizer has one).

    Returns:
        The prompt's token ids.

    Raises:
        ChatTemplateError: the chat template failed on these messages.
        MoeLocalError: no tokenizer or no chat template, or text that is not valid Unicode.
    """
    if isinstance(prompt, str):
        tok = _tokenizer(lm)
        check_unicode(prompt)
        if chat is None:
            chat = bool(getattr(tok, "chat_template", None))
        if not chat:
            return list(tok.encode(prompt))
        prompt = [{"role": "user", "content": prompt}]
    items = list(prompt)
    if items and isinstance(items[0], dict):
        return _encode_chat(lm, items)
    return [int(t) for t in items]


class ChatTemplateError(MoeLocalError):
    """The model's chat template failed on a conversation.

    Attributes:
        refused: the template itself refused the conversation with ``raise_exception`` (say, roles
            that do not alternate): the caller's messages are at fault, not the template.
    """

    def __init__(self, model: str, exc: Exception) -> None:
        from jinja2 import TemplateError

        self.refused = type(exc) is TemplateError  # what transformers' raise_exception() raises
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        detail = first if self.refused else f"{type(exc).__name__}: {first}".rstrip(": ")
        super().__init__(f"the chat template of {model} failed: {detail}")


def _encode_chat(lm: LoadedModel, messages: list[dict]) -> list[int]:
    """Apply the chat template to ``messages`` and encode the result, message strings as text."""
    tok = _tokenizer(lm)
    if not getattr(tok, "chat_template", None):
        raise MoeLocalError(f"{lm.name} has no chat template; pass plain text with --no-chat")
    strings = list(_strings(messages))
    for text in strings:
        check_unicode(text)
    kwargs = {}
    spelled = _spelled_added_token(tok, strings)
    if spelled is not None:
        # Only then: a conversation without such spellings keeps exactly the ids it always had.
        if "sanitize_control_tokens" not in inspect.signature(tok.apply_chat_template).parameters:
            raise MoeLocalError(
                f"a message spells out the token {spelled!r}; encoding it as text needs transformers >= 5.20 "
                "(pip install -U transformers), or remove it from the message"
            )
        kwargs["sanitize_control_tokens"] = True
    try:
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    except Exception as exc:  # the template is a program from the checkpoint: any failure is its own
        raise ChatTemplateError(lm.name, exc) from exc
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(t) for t in ids]


def _strings(obj: object) -> Iterator[str]:
    """Every string value in messages (nested dicts and lists too), as the template may print any."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _strings(value)


def _spelled_added_token(tok, strings: Sequence[str]) -> str | None:
    """The first added token whose text appears in ``strings`` (None: none does).

    A superset of what transformers treats as control tokens (the special tokens and the added
    tokens the template writes), less whitespace-only ones that are not special.
    """
    added = getattr(tok, "added_tokens_decoder", None) or {}
    names = [t.content for t in added.values() if t.content and (t.special or not t.content.isspace())]
    for text in strings:
        for name in names:
            if name in text:
                return name
    return None


def check_unicode(text: str) -> None:
    """Refuse text the tokenizer cannot take: lone UTF-16 surrogates (a JSON ``"\\ud800"``).

    Raises:
        MoeLocalError: the text holds one, named with its position.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise MoeLocalError(
            f"the prompt is not valid Unicode text: it holds a lone surrogate U+{ord(bad):04X} "
            f"at character {exc.start}"
        ) from exc


def _tokenizer(lm: LoadedModel):
    if lm.tokenizer is None:
        raise MoeLocalError(f"{lm.name} was loaded without a tokenizer; pass token ids")
    return lm.tokenizer
