"""User-facing errors: each one prints as a single clear line and exits non-zero."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class MoeLocalError(Exception):
    """An error caused by what the user asked for (a bad path, file, option or prompt).

    The CLI prints ``error: <message>`` and exits with ``exit_code``; no traceback.
    """

    exit_code = 2


class CheckpointError(MoeLocalError):
    """The checkpoint folder or one of its files is missing, truncated or malformed."""


class UnsupportedModelError(MoeLocalError):
    """The checkpoint is valid but its family or expert layout is not supported."""


class PromptTooLongError(MoeLocalError):
    """The prompt (plus requested new tokens) does not fit the model's context."""

    def __init__(self, prompt_tokens: int, context: int) -> None:
        super().__init__(
            f"prompt is {prompt_tokens} tokens but the model's context holds {context}; shorten the prompt"
        )
        self.prompt_tokens = prompt_tokens
        self.context = context


class ExpertBlobError(MoeLocalError):
    """An expert's stored weights are truncated or fail their checksum."""

    def __init__(self, layer: int, expert: int, detail: str) -> None:
        super().__init__(f"expert {expert} of layer {layer} is unreadable: {detail}")
        self.layer = layer
        self.expert = expert
