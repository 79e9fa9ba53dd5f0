"""A reply's text as it is generated -> its content and its tool calls, as OpenAI streams them.

OpenAI streams a call as a first delta with its ``index``, ``id``, ``type`` and ``function.name``
(``arguments`` empty, or what is already written), then deltas that each add a piece of the
``arguments`` text. ``ToolCallStream`` re-parses the reply at every step (``ToolSyntax.parse``)
and sends what is new: content, the header of a call whose name just became whole, the growth of
the arguments of a call being written, and the rest of a call when it closes. The arguments'
pieces are beginnings of the text the model writes, so they add up to the call's final
``arguments``.

A call written so badly that it closes as no call at all (only a model left to write freely can)
keeps, in a stream, what was sent of it; the non-streamed answer shows that text as content.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_local.server.tool_calls import Call, ToolSyntax, held, new_call_id


@dataclass(frozen=True)
class CallDelta:
    """A piece of a streamed call: the first of a call has its id and name, the rest add arguments.

    Attributes:
        index: the call's position in the reply.
        id: the call's id (first delta only).
        name: the function's name (first delta only).
        arguments: text to append to the call's arguments (may be "").
    """

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class _Sent:
    """What a client has of one call."""

    id: str
    name: str
    arguments: str = ""


class ToolCallStream:
    """Feeds a reply's text as it comes; returns the content and the calls' deltas since last time.

    The text is the tokens' own (markers kept), so the request's stop strings are applied here:
    the reply ends where one begins, and text that may begin one is held back meanwhile.

    Args:
        syntax: the model's call syntax.
        stop: the request's stop strings.
    """

    def __init__(self, syntax: ToolSyntax, stop: tuple[str, ...] = ()) -> None:
        self.syntax = syntax
        self.stop = tuple(s for s in stop if s)
        self.text = ""
        self.sent = ""
        self.calls: list[tuple[str, Call]] = []  # (id, call) of the calls closed so far
        self.stopped = False
        self._out: list[_Sent] = []  # every call a client has seen begin, by index
        self._skew = 0  # calls begun that then closed as no call: parsed index + skew = client index

    def update(self, delta: str, final: bool = False) -> tuple[str, list[CallDelta]]:
        """Add ``delta``; return (new content, new pieces of calls)."""
        if self.stopped:
            return "", []
        self.text += delta
        text = self.text
        hits = [p for p in (text.find(s) for s in self.stop) if p != -1]
        if hits:
            text, final, self.stopped = text[: min(hits)], True, True
        elif not final:
            text = text[: len(text) - held(text, self.stop)]
        parsed = self.syntax.parse(text, final=final)
        content = ""
        if parsed.content.startswith(self.sent):  # content only grows (a stream cannot take text back)
            content = parsed.content[len(self.sent) :]
            self.sent = parsed.content
        entries = [(c.name, c.arguments, True) for c in parsed.calls]
        entries += [(p.name, p.arguments, False) for p in parsed.pending]
        deltas: list[CallDelta] = []
        for j, (name, arguments, closed) in enumerate(entries):
            if j < len(self.calls):
                continue  # closed, and wholly sent, before
            deltas += self._advance(j, name, arguments, closed)
        return content, deltas

    def _advance(self, j: int, name: str, arguments: str | None, closed: bool) -> list[CallDelta]:
        """The deltas that bring the client's call ``j`` to ``name(arguments)``."""
        k = j + self._skew
        while k < len(self._out) and not _continues(self._out[k], name, arguments):
            self._skew += 1  # that call closed as no call, or as another: this one is a new call
            k += 1
        out = []
        if k == len(self._out):
            sent = _Sent(new_call_id(), name, arguments or "")
            self._out.append(sent)
            out.append(CallDelta(k, sent.id, name, sent.arguments))
        sent = self._out[k]
        if arguments is not None and len(arguments) > len(sent.arguments):
            out.append(CallDelta(k, None, None, arguments[len(sent.arguments) :]))
            sent.arguments = arguments
        if closed:
            self.calls.append((sent.id, Call(name, sent.arguments)))
        return out

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[tuple[str, Call]]]:
        """Add ``delta``; return (new content, the calls closed since last time, with their ids)."""
        before = len(self.calls)
        content, _ = self.update(delta, final)
        return content, self.calls[before:]

    def finish(self) -> tuple[str, list[tuple[str, Call]]]:
        """The end of the reply: what is left, parsed as final."""
        return self.feed("", final=True)


def _continues(sent: _Sent, name: str, arguments: str | None) -> bool:
    """Whether ``name(arguments)`` is what the client's call ``sent`` was becoming."""
    return sent.name == name and (arguments is None or arguments.startswith(sent.arguments))
