"""What passes between the HTTP side and the worker: a queued ``Job`` and the ``Step``s it yields.

A job's steps travel from the worker thread to the request's event loop through an asyncio queue
(``call_soon_threadsafe``); its ``cancelled`` flag travels back and is checked between tokens.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from moe_local.config import SamplingParams


class State(enum.Enum):
    """Where the model is: loading, ready to generate, or failed to load."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class Step:
    """One generated token (or the final summary) as the HTTP layer needs it.

    Attributes:
        text: new text since the previous step.
        token_text: the token's text (logprobs only; None otherwise or on a step without a token).
        token_bytes: the token's exact bytes (logprobs only).
        logprob: log-probability of the token.
        top: the most likely alternatives as (text, bytes, log-probability).
        prompt_tokens: tokens in the prompt.
        completion_tokens: tokens generated so far.
        finish_reason: None until the last step, then "stop" or "length".
        index: which of the request's choices (``n``) the step belongs to.
        raw: the token's exact text, markers (special tokens) kept: what tool calls are parsed
            from (only for jobs that ask for it).
    """

    text: str
    token_text: str | None = None
    token_bytes: bytes = b""
    logprob: float | None = None
    top: list[tuple[str, bytes, float]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    index: int = 0
    raw: str = ""


@dataclass(eq=False)
class Job:
    """A queued request: ``n`` generations of one prompt, one after another, and their channel.

    Attributes:
        n: how many choices (each seeded ``seed + index``; a generation with no seed is random).
        grammar: a compiled grammar every choice must follow (``moe_local.grammar``), or None.
        raw: fill each step's ``raw`` (its exact text); ``raw_skip`` tokens (special tokens that
            are no call marker) are left out of it.
    """

    prompt_ids: list[int]
    params: SamplingParams
    logprobs: bool
    loop: asyncio.AbstractEventLoop
    n: int = 1
    grammar: str | None = None
    raw: bool = False
    raw_skip: frozenset[int] = frozenset()
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    on_cancel: Callable[[Job], None] | None = None

    def cancel(self) -> None:
        """Stop the generation at its next token (or drop it from the queue if it has not started)."""
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel(self)

    def put(self, item: Step | Exception | None) -> None:
        """Hand an item to the request's event loop (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    async def steps(self) -> AsyncIterator[Step]:
        """Yield the job's steps until it ends; leaving early cancels the generation.

        Yields:
            Step per token, then the final step (``finish_reason`` set).

        Raises:
            ApiError: the generation failed.
        """
        try:
            while True:
                item = await self.events.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.cancel()
