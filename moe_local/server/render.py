"""Engine steps -> OpenAI response objects and server-sent-event chunks.

``ChatRenderer`` and ``CompletionRenderer`` share one interface: ``start()`` the first chunks,
``chunks(step)`` the chunks a step produces (for the step's choice, ``step.index``),
``end(index, reason)`` a choice's last ones, ``close(usage, ...)`` the stream's end, and
``whole(choices)`` the non-streamed response. Every response carries ``usage`` (completion tokens
summed over the choices, the prompt counted once, as OpenAI counts); a stream carries it in a last
chunk with no choices when the request asked for ``stream_options.include_usage``. A chat renderer
given a tool syntax parses each choice's raw text into ``tool_calls``: whole, or streamed as
OpenAI streams them (``moe_local.server.tool_stream``): a first delta with the call's id and name,
then deltas each adding a piece of its ``arguments`` as the model writes them.
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
    FunctionCall,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)
from moe_local.server.tool_calls import Call, ToolSyntax
from moe_local.server.tool_stream import CallDelta, ToolCallStream

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict) -> str:
    """Format one server-sent event carrying JSON."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def usage_of(choices: Sequence[Sequence[Step]], prompt_tokens: int) -> Usage:
    """Token counts: each choice's last step, summed (the prompt's count alone when no step came)."""
    done = sum(steps[-1].completion_tokens for steps in choices if steps)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done)


def finish_of(steps: Sequence[Step]) -> str:
    """A choice's finish reason ("length" when it has none)."""
    return (steps[-1].finish_reason if steps else None) or "length"


class _Renderer:
    prefix = "cmpl"

    def __init__(self, model: str, prompt_tokens: int, logprobs: bool, n: int = 1) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.logprobs = logprobs
        self.n = n

    def close(self, usage: Usage, include_usage: bool) -> list[str]:
        """The stream's end: the usage chunk if asked for, then ``[DONE]``."""
        return [self._usage_chunk(usage), DONE] if include_usage else [DONE]

    def _usage_chunk(self, usage: Usage) -> str:
        raise NotImplementedError


class ChatRenderer(_Renderer):
    """Builds ``chat.completion`` objects and ``chat.completion.chunk`` events.

    Args:
        model: the served model's name.
        prompt_tokens: tokens in the prompt.
        logprobs: report log-probabilities.
        n: choices.
        syntax: the model's tool-call syntax when the request has tools (replies are parsed).
        stop: the request's stop strings (applied to the parsed text).
        one_call: ``parallel_tool_calls: false``: a reply's calls after its first are dropped.
    """

    prefix = "chatcmpl"

    def __init__(
        self,
        model: str,
        prompt_tokens: int,
        logprobs: bool,
        n: int = 1,
        syntax: ToolSyntax | None = None,
        stop: tuple[str, ...] = (),
        one_call: bool = False,
    ) -> None:
        super().__init__(model, prompt_tokens, logprobs, n)
        self.syntax = syntax
        self.stop = stop
        self.one_call = one_call
        self.streams = [ToolCallStream(syntax, stop) for _ in range(n)] if syntax is not None else []

    def _chunk(
        self,
        delta: AssistantMessage,
        index: int,
        logprobs: ChatLogprobs | None = None,
        finish: str | None = None,
    ) -> str:
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
        return sse(
            ChatCompletion(
                id=self.id,
                object="chat.completion.chunk",
                created=self.created,
                model=self.model,
                choices=[choice],
            )
        )

    def _usage_chunk(self, usage: Usage) -> str:
        return sse(
            ChatCompletion(
                id=self.id,
                object="chat.completion.chunk",
                created=self.created,
                model=self.model,
                choices=[],
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
        """The first chunk of each choice: the assistant's role."""
        return [self._chunk(AssistantMessage(role="assistant", content=""), i) for i in range(self.n)]

    def chunks(self, step: Step) -> list[str]:
        """The chunks a step brings: its text (none when it brings no text and no logprobs), its calls."""
        if self.syntax is None:
            text, calls = step.text, []
        else:
            text, calls = self.streams[step.index].update(step.raw)
        out = []
        if text or step.token_text is not None:
            out.append(self._chunk(AssistantMessage(content=text), step.index, self._logprobs([step])))
        return out + self._call_chunks(step.index, calls)

    def _call_chunks(self, index: int, deltas: list[CallDelta]) -> list[str]:
        """One chunk per delta, without null fields: clients merge deltas key by key, and a null
        ``type`` or ``id`` would overwrite the call's (the official client's accumulation does)."""
        out = []
        for d in deltas:
            if self.one_call and d.index > 0:
                continue
            payload = ChatCompletion(
                id=self.id,
                object="chat.completion.chunk",
                created=self.created,
                model=self.model,
                choices=[ChatChunkChoice(index=index, delta=AssistantMessage())],
            ).model_dump()
            call: dict = {"index": d.index, "function": {"arguments": d.arguments}}
            if d.id is not None:
                call = {
                    "index": d.index,
                    "id": d.id,
                    "type": "function",
                    "function": {"name": d.name, **call["function"]},
                }
            payload["choices"][0]["delta"] = {"tool_calls": [call]}
            out.append(sse(payload))
        return out

    def end(self, index: int, finish_reason: str) -> list[str]:
        """A choice's last chunks: what its parser held back, then its finish reason."""
        out = []
        if self.syntax is not None:
            stream = self.streams[index]
            text, calls = stream.update("", final=True)
            if text:
                out.append(self._chunk(AssistantMessage(content=text), index))
            out += self._call_chunks(index, calls)
            if stream.calls and finish_reason == "stop":
                finish_reason = "tool_calls"
        return [*out, self._chunk(AssistantMessage(), index, finish=finish_reason)]

    def whole(self, choices: Sequence[Sequence[Step]]) -> ChatCompletion:
        """The non-streamed response."""
        out = []
        for index, steps in enumerate(choices):
            finish = finish_of(steps)
            message = AssistantMessage(role="assistant", content="".join(s.text for s in steps))
            if self.syntax is not None:
                stream = ToolCallStream(self.syntax, self.stop)
                content, _ = stream.feed("".join(s.raw for s in steps))
                content += stream.finish()[0]
                calls = [_tool_call(call_id, c) for call_id, c in stream.calls]
                calls = calls[:1] if self.one_call else calls
                message = AssistantMessage(
                    role="assistant",
                    content=content if content or not calls else None,
                    tool_calls=calls or None,
                )
                finish = "tool_calls" if calls and finish == "stop" else finish
            out.append(
                ChatChoice(index=index, message=message, logprobs=self._logprobs(steps), finish_reason=finish)
            )
        return ChatCompletion(
            id=self.id,
            object="chat.completion",
            created=self.created,
            model=self.model,
            choices=out,
            usage=usage_of(choices, self.prompt_tokens),
        )


def _tool_call(call_id: str, call: Call) -> ToolCall:
    return ToolCall(id=call_id, function=FunctionCall(name=call.name, arguments=call.arguments))


class CompletionRenderer(_Renderer):
    """Builds ``text_completion`` objects and chunks."""

    def __init__(self, model: str, prompt_tokens: int, logprobs: bool, n: int = 1) -> None:
        super().__init__(model, prompt_tokens, logprobs, n)
        self.offsets = [0] * n  # characters of each choice so far (logprobs' text_offset)

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
            out.text_offset.append(self.offsets[s.index])
            self.offsets[s.index] += len(s.token_text)
        return out

    def _chunk(
        self, text: str, index: int, logprobs: CompletionLogprobs | None = None, finish: str | None = None
    ) -> str:
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
        return sse(Completion(id=self.id, created=self.created, model=self.model, choices=[choice]))

    def _usage_chunk(self, usage: Usage) -> str:
        return sse(Completion(id=self.id, created=self.created, model=self.model, choices=[], usage=usage))

    def start(self) -> list[str]:
        """Text completions start with the first token's chunk."""
        return []

    def chunks(self, step: Step) -> list[str]:
        """The chunk carrying a step's text (none when it brings no text and no logprobs)."""
        if not step.text and step.token_text is None:
            return []
        return [self._chunk(step.text, step.index, self._logprobs([step]))]

    def end(self, index: int, finish_reason: str) -> list[str]:
        """A choice's last chunk: its finish reason."""
        return [self._chunk("", index, finish=finish_reason)]

    def whole(self, choices: Sequence[Sequence[Step]]) -> Completion:
        """The non-streamed response."""
        out = [
            CompletionChoice(
                index=i,
                text="".join(s.text for s in steps),
                logprobs=self._logprobs(steps),
                finish_reason=finish_of(steps),
            )
            for i, steps in enumerate(choices)
        ]
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=out,
            usage=usage_of(choices, self.prompt_tokens),
        )
