"""Models' tool-call syntaxes: parse generated text into OpenAI ``tool_calls``, whole or streamed.

Each family writes calls its own way; a ``ToolSyntax`` knows one of them:

- ``hermes`` (Qwen, Hermes, OLMoE and the fallback): ``<tool_call>{"name", "arguments"}</tool_call>``;
- ``mistral``: ``[TOOL_CALLS][{"name", "arguments"}, ...]``, or ``[TOOL_CALLS]name[ARGS]{...}``;
- ``llama3``: the whole reply is ``{"name", "parameters"}`` (``;`` between several calls), after an
  optional ``<|python_tag|>``;
- ``deepseek``: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>...<｜tool▁sep｜>...`` in V3's form
  (``function<sep>NAME`` then a fenced JSON block) or V3.1's (``NAME<sep>{...}``);
- ``harmony`` (GPT-OSS): ``<|channel|>commentary to=functions.NAME ... <|message|>{...}<|call|>``;
  only the ``final`` channel is content (the ``analysis`` channel is the model's reasoning).

``parse(text, final)`` is pure: on an unfinished text it returns the content that can no longer
become part of a call and the calls already closed, so a stream re-parses what it has and sends
the difference (``ToolCallStream``). The text must keep the markers, which are often special
tokens: the engine builds it from the tokens' own bytes for tool requests.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Call:
    """A parsed call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


@dataclass
class Parsed:
    """What a reply holds: text for the user and the calls, in order."""

    content: str = ""
    calls: list[Call] = field(default_factory=list)


def _call_of(obj: Any, args_key: str = "arguments") -> Call | None:
    """A call from ``{"name": ..., "arguments"|"parameters": {...}}`` (None when it is not one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("parameters", obj.get("arguments", {})))
    return _call(obj["name"], args)


def _call(name: str, args: Any) -> Call | None:
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(args, dict) or not name.strip():
        return None
    return Call(name.strip(), json.dumps(args, ensure_ascii=False))


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _held(text: str, markers: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could be the start of a marker."""
    return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


class ToolSyntax:
    """One family's call syntax (``moe_local.server.tools`` spells a forced call in it).

    Attributes:
        name: the syntax's name (``hermes`` ...).
        markers: the strings that delimit calls (kept in the text the parser reads).
    """

    name = ""
    markers: tuple[str, ...] = ()

    def parse(self, text: str, final: bool = True) -> Parsed:
        """Split ``text`` into content and calls (unfinished: only what is settled)."""
        raise NotImplementedError


class _Regions(ToolSyntax):
    """Calls inside ``begin ... end`` regions (end optional at the end of the reply)."""

    begin = ""
    end = ""

    def body(self, text: str) -> list[Call] | None:
        raise NotImplementedError

    def parse(self, text: str, final: bool = True) -> Parsed:
        out, pos = Parsed(), 0
        while True:
            start = text.find(self.begin, pos)
            if start == -1:
                rest = text[pos:]
                out.content += rest if final else rest[: len(rest) - _held(rest, (self.begin,))]
                return out
            out.content += text[pos:start]
            inner = start + len(self.begin)
            stop = text.find(self.end, inner) if self.end else -1
            if stop == -1 and not final:
                return out  # an open region: nothing after it is settled
            body = text[inner:] if stop == -1 else text[inner:stop]
            calls = self.body(body)
            after = len(text) if stop == -1 else stop + len(self.end)
            if calls:
                out.calls += calls
            else:  # not a call after all: the text stays the user's
                out.content += text[start:after]
            pos = after


class HermesSyntax(_Regions):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen, Hermes)."""

    name = "hermes"
    begin, end = "<tool_call>", "</tool_call>"
    markers = (begin, end)

    def body(self, text: str) -> list[Call] | None:
        call = _call_of(_json(text.strip()))
        return [call] if call else None


class DeepSeekSyntax(_Regions):
    """DeepSeek V3 / V3.1 / R1 call markers."""

    name = "deepseek"
    begin, end = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    call_begin, call_end, sep = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
    markers = (begin, end, call_begin, call_end, sep)
    fenced = False  # V3 writes calls as function<sep>NAME then a fenced block (its template says so)
    _FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)

    def body(self, text: str) -> list[Call] | None:
        calls = []
        for block in text.split(self.call_begin)[1:]:
            block = block.split(self.call_end)[0]
            if self.sep not in block:
                return None
            head, rest = block.split(self.sep, 1)
            if head.strip() == "function":  # V3: function<sep>NAME\n```json\n{...}\n```
                name, _, args = rest.partition("\n")
                fenced = self._FENCE.search(args)
                call = _call(name, fenced.group(1) if fenced else args)
            else:  # V3.1: NAME<sep>{...}
                call = _call(head, rest)
            if call is None:
                return None
            calls.append(call)
        return calls or None


class MistralSyntax(ToolSyntax):
    """``[TOOL_CALLS]`` then a JSON list of calls, or ``name[ARGS]{...}`` (newer tokenizers)."""

    name = "mistral"
    begin, args = "[TOOL_CALLS]", "[ARGS]"
    markers = (begin, args)
    named = False  # newer templates write [TOOL_CALLS]name[ARGS]{...} (their template says so)

    def parse(self, text: str, final: bool = True) -> Parsed:
        start = text.find(self.begin)
        if start == -1:
            stripped = text.lstrip()
            if stripped.startswith("["):  # maybe a bare list of calls (the marker decoded away)
                if not final:
                    return Parsed("")
                calls = self._calls(stripped)
                return Parsed("", calls) if calls else Parsed(text)
            return Parsed(text if final else text[: len(text) - _held(text, (self.begin,))])
        if not final:  # the calls run to the end of the reply
            return Parsed(text[:start])
        calls = self._calls(text[start:])
        return Parsed(text[:start], calls) if calls else Parsed(text)

    def _calls(self, text: str) -> list[Call] | None:
        calls: list[Call] = []
        for piece in text.split(self.begin):
            piece = piece.strip()
            if not piece:
                continue
            if self.args in piece:
                name, _, args = piece.partition(self.args)
                call = _call(name, args)
                if call is None:
                    return None
                calls.append(call)
                continue
            data = _json(piece)
            items = data if isinstance(data, list) else [data]
            found = [_call_of(item) for item in items]
            if not found or any(c is None for c in found):
                return None
            calls += [c for c in found if c is not None]
        return calls or None


class Llama3Syntax(ToolSyntax):
    """Llama 3.x: the reply is ``{"name": ..., "parameters": {...}}`` (``;`` between several)."""

    name = "llama3"
    tag = "<|python_tag|>"
    markers = (tag,)

    def parse(self, text: str, final: bool = True) -> Parsed:
        body = text.strip()
        body = body[len(self.tag) :].strip() if body.startswith(self.tag) else body
        maybe_call = not body or body.startswith("{") or self.tag.startswith(body)
        if not final:
            return Parsed("" if maybe_call else text)
        if body.startswith("{"):
            calls = [_call_of(_json(part), "parameters") for part in _split_objects(body)]
            if calls and all(c is not None for c in calls):
                return Parsed("", [c for c in calls if c is not None])
        return Parsed(text)


def _split_objects(text: str) -> list[str]:
    """``{...}; {...}`` -> the objects' texts (one text when it does not split cleanly)."""
    parts = [p.strip() for p in re.split(r"\}\s*;\s*\{", text)]
    if len(parts) == 1:
        return parts
    return [("" if i == 0 else "{") + p + ("" if i == len(parts) - 1 else "}") for i, p in enumerate(parts)]


class HarmonySyntax(ToolSyntax):
    """GPT-OSS's harmony format: channels, and calls addressed ``to=functions.NAME``."""

    name = "harmony"
    markers = (
        "<|start|>",
        "<|channel|>",
        "<|message|>",
        "<|end|>",
        "<|call|>",
        "<|return|>",
        "<|constrain|>",
    )
    _ENDS = ("<|end|>", "<|call|>", "<|return|>")
    _TO = re.compile(r"to=functions\.([^\s<]+)")

    def parse(self, text: str, final: bool = True) -> Parsed:
        out = Parsed()
        segments = text.split("<|start|>")
        for i, segment in enumerate(segments):
            unfinished = i == len(segments) - 1 and not final
            head, has_body, body = segment.partition("<|message|>")
            if not has_body:
                if "<|channel|>" in head or head.startswith("assistant") or (i > 0 and unfinished):
                    if unfinished:  # a header still being written
                        return out
                    continue
                out.content += head[: len(head) - _held(head, self.markers)] if unfinished else head
                continue
            ends = [p for p in (body.find(e) for e in self._ENDS) if p != -1]
            closed = bool(ends)
            body = body[: min(ends)] if closed else body
            recipient = self._TO.search(head)
            if recipient:
                call = _call(recipient.group(1), body.strip()) if closed or not unfinished else None
                if call is not None:
                    out.calls.append(call)
            elif "final" in head.rsplit("<|channel|>", 1)[-1]:
                keep = len(body) if closed or not unfinished else len(body) - _held(body, self._ENDS)
                out.content += body[:keep]
        return out


SYNTAXES: dict[str, Callable[[], ToolSyntax]] = {
    "hermes": HermesSyntax,
    "mistral": MistralSyntax,
    "llama3": Llama3Syntax,
    "deepseek": DeepSeekSyntax,
    "harmony": HarmonySyntax,
}
# what in a chat template gives its syntax away, checked in order
_TEMPLATE_MARKS = (
    ("tool▁calls▁begin", "deepseek"),
    ("<|channel|>", "harmony"),
    ("[TOOL_CALLS]", "mistral"),
    ("<tool_call>", "hermes"),
    ("<|python_tag|>", "llama3"),
    ("<|eom_id|>", "llama3"),
)
_FAMILY = {
    "mixtral": "mistral",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
    "gpt_oss": "harmony",
    "llama4": "llama3",
}


def syntax_for(template: str | None, family: str | None = None) -> ToolSyntax:
    """The call syntax a model uses: from markers its chat template contains, else its family.

    Args:
        template: the chat template's text.
        family: the model type (``qwen3_moe``, ``mixtral`` ...).

    Returns:
        The syntax (Hermes' when nothing tells).
    """
    name = next((n for mark, n in _TEMPLATE_MARKS if template and mark in template), None)
    syntax = SYNTAXES[name or _FAMILY.get(family or "", "hermes")]()
    if isinstance(syntax, DeepSeekSyntax):
        syntax.fenced = bool(template) and "```json" in str(template)
    if isinstance(syntax, MistralSyntax):
        syntax.named = bool(template) and "[ARGS]" in str(template)
    return syntax


def new_call_id() -> str:
    """An OpenAI-style call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """Feeds a reply's text as it comes; returns the content and the calls settled since last time.

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
        self.calls: list[tuple[str, Call]] = []  # (id, call) sent so far
        self.stopped = False

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[tuple[str, Call]]]:
        """Add ``delta``; return (new content, new calls with their ids)."""
        if self.stopped:
            return "", []
        self.text += delta
        text = self.text
        hits = [p for p in (text.find(s) for s in self.stop) if p != -1]
        if hits:
            text, final, self.stopped = text[: min(hits)], True, True
        elif not final:
            text = text[: len(text) - _held(text, self.stop)]
        parsed = self.syntax.parse(text, final=final)
        content = ""
        if parsed.content.startswith(self.sent):  # content only grows (a stream cannot take text back)
            content = parsed.content[len(self.sent) :]
            self.sent = parsed.content
        new = [(new_call_id(), c) for c in parsed.calls[len(self.calls) :]]
        self.calls += new
        return content, new

    def finish(self) -> tuple[str, list[tuple[str, Call]]]:
        """The end of the reply: what is left, parsed as final."""
        return self.feed("", final=True)
