"""Where JSON values begin and end in a text that may still be growing (a reply being streamed).

The tool-call parsers need the exact text of a call's arguments, not a re-serialisation: a stream
sends the arguments as they are written, and the whole reply's ``arguments`` must be the same
string. These helpers find the spans; ``json.loads`` still decides whether a closed span is valid.

    >>> members('{"name": "f", "arguments": {"a": 1', 0)[0][1]
    Member(key='arguments', start=27, end=None)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_WS = " \t\r\n"
_SCALAR_END = ",}] \t\r\n"
_CLOSE = {"{": "}", "[": "]"}


class Malformed(ValueError):
    """The text cannot be the beginning of a JSON value."""


@dataclass(frozen=True)
class Member:
    """A member of an object: its key, and where its value starts and ends (None: not yet)."""

    key: str
    start: int
    end: int | None


def skip_ws(text: str, i: int) -> int:
    """The first index at or after ``i`` that is not JSON whitespace."""
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def value_end(text: str, i: int) -> int | None:
    """The index just past the JSON value that starts at ``text[i]``; None when the text ends first.

    Raises:
        Malformed: a bracket closes what it did not open.
    """
    n = len(text)
    if i >= n:
        return None
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] not in _CLOSE:  # a number or a literal: it ends where a delimiter comes
        j = i
        while j < n and text[j] not in _SCALAR_END:
            j += 1
        return j if j < n else None
    stack: list[str] = []
    j = i
    while j < n:
        c = text[j]
        if c == '"':
            end = _string_end(text, j)
            if end is None:
                return None
            j = end
            continue
        if c in _CLOSE:
            stack.append(_CLOSE[c])
        elif c in "}]":
            if not stack or stack.pop() != c:
                raise Malformed(f"unexpected {c!r} at {j}")
            if not stack:
                return j + 1
        j += 1
    return None


def _string_end(text: str, i: int) -> int | None:
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text[j] == '"':
            return j + 1
        else:
            j += 1
    return None


def members(text: str, i: int) -> tuple[list[Member], int | None]:
    """The top-level members of the object at ``text[i]`` as far as the text goes.

    Returns:
        The members seen (the last one's ``end`` None when its value is unfinished), and the
        index just past the object (None while it is open).

    Raises:
        Malformed: the text cannot begin an object here.
    """
    if i >= len(text) or text[i] != "{":
        raise Malformed("not an object")
    out: list[Member] = []
    j = skip_ws(text, i + 1)
    while j < len(text):
        if text[j] == "}" and not out:
            return out, j + 1
        if text[j] != '"':
            raise Malformed(f"a key was expected at {j}")
        key_end = _string_end(text, j)
        if key_end is None:
            return out, None
        key = json.loads(text[j:key_end])
        j = skip_ws(text, key_end)
        if j >= len(text):
            return out, None
        if text[j] != ":":
            raise Malformed(f"':' was expected at {j}")
        j = skip_ws(text, j + 1)
        if j >= len(text):
            return out, None
        end = value_end(text, j)
        out.append(Member(key, j, end))
        if end is None:
            return out, None
        j = skip_ws(text, end)
        if j >= len(text):
            return out, None
        if text[j] == "}":
            return out, j + 1
        if text[j] != ",":
            raise Malformed(f"',' or '}}' was expected at {j}")
        j = skip_ws(text, j + 1)
    return out, None


def elements(text: str, i: int) -> tuple[list[tuple[int, int | None]], int | None]:
    """The spans of the elements of the array at ``text[i]`` as far as the text goes.

    Returns:
        ``(start, end)`` of each element seen (the last one's end None when unfinished), and the
        index just past the array (None while it is open).

    Raises:
        Malformed: the text cannot begin an array here.
    """
    if i >= len(text) or text[i] != "[":
        raise Malformed("not an array")
    out: list[tuple[int, int | None]] = []
    j = skip_ws(text, i + 1)
    while j < len(text):
        if text[j] == "]" and not out:
            return out, j + 1
        end = value_end(text, j)
        out.append((j, end))
        if end is None:
            return out, None
        j = skip_ws(text, end)
        if j >= len(text):
            return out, None
        if text[j] == "]":
            return out, j + 1
        if text[j] != ",":
            raise Malformed(f"',' or ']' was expected at {j}")
        j = skip_ws(text, j + 1)
    return out, None


def object_text(text: str) -> str | None:
    """``text`` stripped when it is exactly one JSON object's text (checked by ``json.loads``)."""
    s = text.strip()
    try:
        if not s.startswith("{") or value_end(s, 0) != len(s):
            return None
        return s if isinstance(json.loads(s), dict) else None
    except (Malformed, ValueError, RecursionError):
        return None


def object_prefix(text: str) -> str | None:
    """The beginning of a JSON object at the start of ``text`` (leading whitespace skipped), as far as it
    can be sure: the whole object once it closes. None when ``text`` does not begin one."""
    s = text.lstrip(_WS)
    if not s.startswith("{"):
        return None
    try:
        end = value_end(s, 0)
    except Malformed:
        return None
    return s if end is None else s[:end]
