"""Engine steps -> OpenAI response objects and server-sent-event chunks.

``ChatRenderer`` and ``CompletionRenderer`` share one interface: ``chunks(step)`` returns the
stream chunks a step produces, ``finish(...)`` the last ones, ``whole(steps)`` the non-streamed
response. Every response carries ``usage``; a stream carries it in a last chunk with no choices
when the request asked for ``stream_options.include_usage``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence

from pydantic import BaseModel

from moe_local.server.jobs import Step
from moe_local.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
)

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict) -> str:
    """Format one server-sent event carrying JSON."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def usage_of(steps: Sequence[Step], prompt_tokens: int) -> Usage:
    """Token counts from the last step (the prompt's count when no step came)."""
    done = steps[-1].completion_tokens if steps else 0
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done)


class _Renderer:
    prefix = "cmpl"

    def __init__(self, model: str, prompt_tokens: int, logprobs: bool) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.logprobs = logprobs
        self.offset = 0  # characters emitted so far (completion logprobs' text_offset)


class ChatRenderer(_Renderer):
    """Builds ``chat.completion`` objects and ``chat.completion.chunk`` events."""

    prefix = "chatcmpl"

    def _chunk(
        self,
        delta: AssistantMessage,
        logprobs: ChatLogprobs | None = None,
        finish: str | None = None,
        usage: Usage | None = None,
    ) -> str:
        choices = (
            []
            if usage is not None
            else [ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish)]
        )
        return sse(
            ChatCompletion(
                id=self.id,
                object="chat.completion.chunk",
                created=self.created,
                model=self.model,
                choices=choices,
                usage=usage,
            )
        )

    def _logprobs(self, steps: Sequence[Step]) -> ChatLogprobs | None:
        if not self.logprobs:
            return None
        content = [
            TokenLogprob(
                token=s.token_text,
                logprob=s.logprob if s.logprob is not None else 0.0,
                bytes=list(s.token_bytes),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(b)) for t, b, lp in s.top],
            )
            for s in steps
            if s.token_text is not None
        ]
        return ChatLogprobs(content=content)

    def start(self) -> list[str]:
        """The first chunk: the assistant's role."""
        return [self._chunk(AssistantMessage(role="assistant", content=""))]

    def chunks(self, step: Step) -> list[str]:
        """The chunk carrying a step's text (none when it brings no text and no logprobs)."""
        if not step.text and step.token_text is None:
            return []
        return [self._chunk(AssistantMessage(content=step.text), self._logprobs([step]))]

    def finish(self, finish_reason: str, usage: Usage, include_usage: bool) -> list[str]:
        """The closing chunks: the finish reason, then the usage if asked for, then ``[DONE]``."""
        out = [self._chunk(AssistantMessage(), finish=finish_reason)]
        if include_usage:
            out.append(self._chunk(AssistantMessage(), usage=usage))
        return [*out, DONE]

    def whole(self, steps: Sequence[Step]) -> ChatCompletion:
        """The non-streamed response."""
        message = AssistantMessage(role="assistant", content="".join(s.text for s in steps))
        finish = steps[-1].finish_reason if steps else "length"
        choice = ChatChoice(message=message, logprobs=self._logprobs(steps), finish_reason=finish)
        return ChatCompletion(
            id=self.id,
            object="chat.completion",
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=usage_of(steps, self.prompt_tokens),
        )


class CompletionRenderer(_Renderer):
    """Builds ``text_completion`` objects and chunks."""

    def _logprobs(self, steps: Sequence[Step]) -> CompletionLogprobs | None:
        if not self.logprobs:
            return None
        out = CompletionLogprobs()
        for s in steps:
            if s.token_text is None:
                continue
            out.tokens.append(s.token_text)
            out.token_logprobs.append(s.logprob if s.logprob is not None else 0.0)
            out.top_logprobs.append({t: lp for t, _, lp in s.top})
            out.text_offset.append(self.offset)
            self.offset += len(s.token_text)
        return out

    def _chunk(
        self,
        text: str,
        logprobs: CompletionLogprobs | None = None,
        finish: str | None = None,
        usage: Usage | None = None,
    ) -> str:
        choices = (
            []
            if usage is not None
            else [CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish)]
        )
        return sse(
            Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        )

    def start(self) -> list[str]:
        """Text completions start with the first token's chunk."""
        return []

    def chunks(self, step: Step) -> list[str]:
        """The chunk carrying a step's text (none when it brings no text and no logprobs)."""
        if not step.text and step.token_text is None:
            return []
        return [self._chunk(step.text, self._logprobs([step]))]

    def finish(self, finish_reason: str, usage: Usage, include_usage: bool) -> list[str]:
        """The closing chunks: the finish reason, then the usage if asked for, then ``[DONE]``."""
        out = [self._chunk("", finish=finish_reason)]
        if include_usage:
            out.append(self._chunk("", usage=usage))
        return [*out, DONE]

    def whole(self, steps: Sequence[Step]) -> Completion:
        """The non-streamed response."""
        finish = steps[-1].finish_reason if steps else "length"
        choice = CompletionChoice(
            text="".join(s.text for s in steps), logprobs=self._logprobs(steps), finish_reason=finish
        )
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=usage_of(steps, self.prompt_tokens),
        )
