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
become part of a call, the calls already closed and the calls still being written (``pending``:
the name once it is whole, and the arguments' text so far). A stream re-parses what it has and
sends the difference (``moe_local.server.tool_stream``): a call's first delta carries its id and name, the
next ones each add a piece of its ``arguments``. A call's ``arguments`` is the very text the model
wrote for them (when that is a JSON object), so the pieces a stream sends add up to exactly the
``arguments`` of the whole reply. The text must keep the markers, which are often special tokens:
the engine builds it from the tokens' own bytes for tool requests.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moe_local.server.json_scan import Malformed, elements, members, object_prefix, object_text, value_end


@dataclass(frozen=True)
class Call:
    """A parsed call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Partial:
    """A call still being written: its name (once whole) and its arguments' text so far.

    ``arguments`` is a beginning of the call's final ``arguments`` (None while there is nothing
    that surely is one, e.g. arguments given as a JSON string, which are sent once closed).
    """

    name: str
    arguments: str | None


@dataclass
class Parsed:
    """What a reply holds: text for the user, the calls closed, then the calls still being written."""

    content: str = ""
    calls: list[Call] = field(default_factory=list)
    pending: list[Partial] = field(default_factory=list)


_ARG_KEYS = ("arguments", "parameters")


def _args_key(keys: Any, args_key: str) -> str | None:
    """Which key holds the arguments: ``args_key`` first, then either spelling."""
    return next((k for k in (args_key, *_ARG_KEYS) if k in keys), None)


def _call_of(obj: Any, args_key: str = "arguments", text: str | None = None) -> Call | None:
    """A call from ``{"name": ..., "arguments"|"parameters": {...}}`` (None when it is not one).

    Args:
        obj: the parsed object.
        args_key: the key the syntax uses for the arguments.
        text: the object's own text, to keep the arguments as written.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    key = _args_key(obj, args_key)
    args = obj.get(key, {}) if key else {}
    if text is not None and key is not None and isinstance(args, dict):
        raw = _member_text(text.strip(), key)
        if raw is not None:
            args = raw
    return _call(obj["name"], args)


def _member_text(text: str, key: str) -> str | None:
    """The text of member ``key``'s value in the object ``text`` (the last one, as json.loads keeps)."""
    try:
        found = [m for m in members(text, 0)[0] if m.key == key and m.end is not None]
    except (Malformed, ValueError):
        return None
    return text[found[-1].start : found[-1].end] if found else None


def _call(name: str, args: Any) -> Call | None:
    """A call of ``name``: arguments given as text are kept as written when they are one JSON object."""
    if isinstance(args, str):
        kept = object_text(args)
        if kept is not None:
            return Call(name.strip(), kept) if name.strip() else None
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(args, dict) or not name.strip():
        return None
    return Call(name.strip(), json.dumps(args, ensure_ascii=False))


def _partial_object(text: str, i: int, args_key: str = "arguments") -> Partial | None:
    """The call an unfinished ``{"name": ..., "arguments": {...`` at ``text[i]`` is becoming."""
    try:
        found = members(text, i)[0]
    except (Malformed, ValueError):
        return None
    names = [m for m in found if m.key == "name" and m.end is not None]
    name = _json(text[names[0].start : names[0].end]) if names else None
    if not isinstance(name, str) or not name.strip():
        return None
    key = _args_key({m.key for m in found}, args_key)
    value = next((m for m in found if m.key == key), None)
    args = None
    if value is not None and text.startswith("{", value.start):
        args = text[value.start : value.end if value.end is not None else len(text)]
    return Partial(name.strip(), args)


def _partial_args(name: str, text: str) -> Partial | None:
    """The call of ``name`` whose arguments' text begins ``text`` (leading whitespace skipped)."""
    return Partial(name.strip(), object_prefix(text)) if name.strip() else None


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def held(text: str, markers: tuple[str, ...]) -> int:
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
    """Calls inside ``begin ... end`` regions (end optional at the end of the reply).

    Whitespace between a call and the next (or the end) separates them: it is not content.
    """

    begin = ""
    end = ""

    def body(self, text: str) -> list[Call] | None:
        raise NotImplementedError

    def pending(self, text: str) -> list[Partial]:
        """The calls an open region's ``text`` is becoming."""
        raise NotImplementedError

    def parse(self, text: str, final: bool = True) -> Parsed:
        out, pos = Parsed(), 0
        while True:
            start = text.find(self.begin, pos)
            if start == -1:
                rest = text[pos:]
                if out.calls and not rest.strip():
                    return out  # after a call: a separator, or the wait for what follows
                out.content += rest if final else rest[: len(rest) - held(rest, (self.begin,))]
                return out
            gap = text[pos:start]
            if not (out.calls and not gap.strip()):
                out.content += gap
            inner = start + len(self.begin)
            stop = text.find(self.end, inner) if self.end else -1
            if stop == -1 and not final:
                out.pending = self.pending(text[inner:])
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
        call = _call_of(_json(text.strip()), text=text)
        return [call] if call else None

    def pending(self, text: str) -> list[Partial]:
        s = text.lstrip()
        call = _partial_object(s, 0) if s.startswith("{") else None
        return [call] if call else []


class DeepSeekSyntax(_Regions):
    """DeepSeek V3 / V3.1 / R1 call markers."""

    name = "deepseek"
    begin, end = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    call_begin, call_end, sep = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
    markers = (begin, end, call_begin, call_end, sep)
    fenced = False  # V3 writes calls as function<sep>NAME then a fenced block (its template says so)
    _FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)
    _FENCE_OPEN = re.compile(r"\s*```(?:json)?")

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

    def pending(self, text: str) -> list[Partial]:
        out = []
        for block in text.split(self.call_begin)[1:]:
            block = block.split(self.call_end)[0]
            if self.sep not in block:
                break
            head, rest = block.split(self.sep, 1)
            if head.strip() == "function":
                name, newline, args = rest.partition("\n")
                fence = self._FENCE_OPEN.match(args)
                if not newline or fence is None:
                    break  # the name, or the fence's opening, is still being written
                call = _partial_args(name, args[fence.end() :])
            else:
                call = _partial_args(head, rest)
            if call is None:
                break
            out.append(call)
        return out


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
                    return Parsed("", pending=self._pending(stripped))
                calls = self._calls(stripped)
                return Parsed("", calls) if calls else Parsed(text)
            return Parsed(text if final else text[: len(text) - held(text, (self.begin,))])
        if not final:  # the calls run to the end of the reply
            return Parsed(text[:start], pending=self._pending(text[start:]))
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
            found = _listed_calls(piece)
            if not found:
                return None
            calls += found
        return calls or None

    def _pending(self, text: str) -> list[Partial]:
        out: list[Partial] = []
        for piece in text.split(self.begin):
            piece = piece.lstrip()
            if not piece:
                continue
            if self.args in piece:
                name, _, args = piece.partition(self.args)
                call = _partial_args(name, args)
                if call is None:
                    return out
                out.append(call)
                continue
            try:
                spans = elements(piece, 0)[0] if piece.startswith("[") else [(0, None)]
            except Malformed:
                return out
            for begin, _ in spans:
                call = _partial_object(piece, begin)
                if call is None:
                    return out
                out.append(call)
        return out


def _listed_calls(text: str) -> list[Call] | None:
    """``[{call}, ...]`` or ``{call}``, each call's arguments kept as written (None: not calls)."""
    data = _json(text)
    try:
        spans = elements(text, 0)[0] if isinstance(data, list) else [(0, len(text))]
    except Malformed:
        return None
    items = data if isinstance(data, list) else [data]
    found = [_call_of(item, text=text[a:b]) for item, (a, b) in zip(items, spans, strict=False)]
    if not found or len(items) != len(spans) or any(c is None for c in found):
        return None
    return [c for c in found if c is not None]


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
            return Parsed("", pending=self._pending(body)) if maybe_call else Parsed(text)
        if body.startswith("{"):
            calls = [_call_of(_json(part), "parameters", part) for part in _split_objects(body)]
            if calls and all(c is not None for c in calls):
                return Parsed("", [c for c in calls if c is not None])
        return Parsed(text)

    def _pending(self, body: str) -> list[Partial]:
        out: list[Partial] = []
        i = 0
        while body.startswith("{", i):
            call = _partial_object(body, i, "parameters")
            if call is None:
                break
            out.append(call)
            try:
                end = value_end(body, i)
            except Malformed:
                break
            if end is None:
                break
            i = end
            while i < len(body) and body[i] in " \t\r\n;":
                i += 1
        return out


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
                out.content += head[: len(head) - held(head, self.markers)] if unfinished else head
                continue
            ends = [p for p in (body.find(e) for e in self._ENDS) if p != -1]
            closed = bool(ends)
            body = body[: min(ends)] if closed else body
            recipient = self._TO.search(head)
            if recipient and unfinished and not closed:
                call = _partial_args(recipient.group(1), body)
                out.pending = [call] if call else []
            elif recipient:
                call = _call(recipient.group(1), body.strip())
                if call is not None:
                    out.calls.append(call)
            elif "final" in head.rsplit("<|channel|>", 1)[-1]:
                keep = len(body) if closed or not unfinished else len(body) - held(body, self._ENDS)
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
