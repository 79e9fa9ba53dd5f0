"""Tools on the request side: checking them, rendering them into the prompt, and forcing a call.

Tools go through the model's own chat template (``apply_chat_template(tools=...)``). A template
that does not mention tools at all (``tools`` is never read) would drop them silently, so then
they are described in a system message in Hermes' syntax, which the reply is parsed in. Assistant
turns with ``tool_calls`` and ``tool`` turns go back to the template as transformers documents
them (arguments as objects); a template that does not read ``tool_calls`` gets them written
into the assistant's text in the model's syntax.

``call_grammar`` spells the syntax's call around a JSON schema per function, as a Lark grammar
for ``moe_local.grammar``: ``tool_choice: "required"`` makes the reply one call or more (exactly one
with ``parallel_tool_calls: false``), a named function exactly one call of it, valid by
construction.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from moe_local.grammar import json_grammar_of, lark_literal
from moe_local.server.protocol import ApiError, ChatMessage
from moe_local.server.tool_calls import ToolSyntax

Literal = Callable[[str], str]  # marker -> its Lark spelling (a special token by id, or a string)
FALLBACK_PROMPT = (
    "You may call functions. To call one, answer only with\n"
    '<tool_call>\n{"name": NAME, "arguments": ARGUMENTS}\n</tool_call>\n'
    "The functions, as JSON schemas:\n<tools>\n"
)


def check_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate ``tools`` (OpenAI's ``[{"type": "function", "function": {...}}]``).

    Returns:
        The tools, each with ``parameters`` (the schema of ``{}`` when missing).

    Raises:
        ApiError: 400 naming the tool that is malformed.
    """
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function")
        if tool.get("type") != "function" or not isinstance(fn, dict):
            raise ApiError(
                400, f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param="tools"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise ApiError(
                400, f"tools[{i}].function.name must be a string of 1-64 characters", param="tools"
            )
        # no parameters declared: the function takes none (and a forced call writes ``{}``)
        params = fn.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(params, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise ApiError(400, "tool names must be unique", param="tools")
    return out


def forced_names(tool_choice: str | dict[str, Any] | None, tools: list[dict[str, Any]]) -> list[str] | None:
    """The functions a reply must call (None: the model may answer in text).

    Raises:
        ApiError: 400 for an unknown ``tool_choice`` or a function not among ``tools``.
    """
    names = [t["function"]["name"] for t in tools]
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        return names
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if (
        not isinstance(tool_choice, dict)
        or tool_choice.get("type") != "function"
        or not isinstance(name, str)
    ):
        raise ApiError(
            400,
            "tool_choice must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    if name not in names:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among tools", param="tool_choice")
    return [name]


def template_reads(template: str | None, name: str) -> bool:
    """Whether the chat template reads the variable or key ``name`` at all."""
    return bool(template) and name in str(template)


def template_messages(
    messages: list[ChatMessage], syntax: ToolSyntax, *, calls_in_template: bool
) -> list[dict[str, Any]]:
    """Messages as the chat template takes them, tool calls and tool results included.

    Args:
        messages: the request's messages.
        syntax: the model's call syntax (for templates that do not read ``tool_calls``).
        calls_in_template: the template reads ``tool_calls`` (else they become text).
    """
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.role == "assistant" and m.tool_calls:
            calls = [_template_call(c, i) for i, c in enumerate(m.tool_calls)]
            names.update({c["id"]: c["function"]["name"] for c in calls})
            if calls_in_template:
                item["tool_calls"] = calls
            else:
                item["content"] = (item["content"] + "\n" + render_calls(syntax, calls)).strip()
        if m.role == "tool":
            if calls_in_template:
                item["tool_call_id"] = m.tool_call_id or ""
                item["name"] = m.name or names.get(m.tool_call_id or "", "")
            else:
                item = {"role": "user", "content": f"<tool_response>\n{item['content']}\n</tool_response>"}
        out.append(item)
    return out


def _template_call(call: dict[str, Any], index: int) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ApiError(400, "an assistant tool_call needs function.name", param="messages")
    args: Any = fn.get("arguments") or "{}"
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError as exc:
            raise ApiError(400, "a tool_call's arguments must be JSON text", param="messages") from exc
    call_id = call.get("id") or f"call_{index}"
    return {"id": call_id, "type": "function", "function": {"name": fn["name"], "arguments": args}}


def render_calls(syntax: ToolSyntax, calls: list[dict[str, Any]]) -> str:
    """Calls written the way ``syntax`` reads them (for templates that cannot)."""
    pairs = [(c["function"]["name"], json.dumps(c["function"]["arguments"])) for c in calls]
    spell = {
        "mistral": lambda: (
            "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": json.loads(a)} for n, a in pairs])
        ),
        "llama3": lambda: "; ".join(json.dumps({"name": n, "parameters": json.loads(a)}) for n, a in pairs),
    }.get(syntax.name)
    if spell is not None:
        return spell()
    return "\n".join(
        f'<tool_call>\n{{"name": {json.dumps(n)}, "arguments": {a}}}\n</tool_call>' for n, a in pairs
    )


def fallback_system(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with the tools described in the (first) system message, Hermes' way."""
    text = FALLBACK_PROMPT + "\n".join(json.dumps(t["function"]) for t in tools) + "\n</tools>"
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}".strip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def call_grammar(
    syntax: ToolSyntax,
    tools: list[dict[str, Any]],
    names: list[str],
    literal: Literal,
    *,
    parallel: bool = False,
) -> str:
    """A Lark grammar whose every sentence is a call, in ``syntax``, of one of ``names``.

    Args:
        syntax: the model's call syntax.
        tools: the checked tools.
        names: the functions allowed.
        literal: how a marker is spelled in the grammar.
        parallel: one call or more, each of any of ``names``, as the syntax writes several
            (in harmony a call ends the turn: one there); else exactly one.
    """
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    prefix, sep, suffix = _frame(syntax, literal)
    more = f" ({sep} one)*" if sep else " one*"
    repeat = more if parallel and syntax.name != "harmony" else ""
    rules = ["start: " + " ".join(p for p in (prefix, "one" + repeat, suffix) if p)]
    rules.append("one: " + " | ".join(f"call_{i}" for i in range(len(names))))
    for i, name in enumerate(names):
        body = _spelled_call(syntax, name, schemas[name], literal)
        rules.append(f"call_{i}: " + body.replace(_ARGS, f"args_{i}"))
        if _ARGS in body:
            rules.append(f"args_{i}: {json_grammar_of(schemas[name])}")
    return "\n".join(rules)


_ARGS = "\0ARGS\0"  # where the arguments' rule goes (JSON text never holds a raw NUL)
_DS = ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>")


def _frame(syntax: ToolSyntax, literal: Literal) -> tuple[str, str, str]:
    """What comes before the calls, between two, and after them, as Lark expressions ("" for none)."""
    if syntax.name == "mistral" and not getattr(syntax, "named", False):  # one JSON list of calls
        return f"{literal('[TOOL_CALLS]')} {lark_literal('[')}", lark_literal(", "), lark_literal("]")
    if syntax.name == "deepseek":  # the calls of one reply sit in one calls_begin ... calls_end
        return literal(_DS[0]), "", literal(_DS[3])
    if syntax.name == "llama3":
        return "", lark_literal("; "), ""
    if syntax.name == "hermes":
        return "", lark_literal("\n"), ""
    return "", "", ""  # mistral's named form: each call has its own [TOOL_CALLS]


def _spelled_call(syntax: ToolSyntax, name: str, schema: dict[str, Any], literal: Literal) -> str:
    """One call of ``name`` in ``syntax`` as a Lark expression (arguments as ``_ARGS`` where apart)."""
    whole = {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": schema},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    if syntax.name == "mistral" and getattr(syntax, "named", False):
        return f"{literal('[TOOL_CALLS]')} {lark_literal(name)} {literal('[ARGS]')} {_ARGS}"
    if syntax.name == "mistral":
        return json_grammar_of(whole)
    if syntax.name == "llama3":
        whole["properties"] = {"name": {"const": name}, "parameters": schema}
        whole["required"] = ["name", "parameters"]
        return json_grammar_of(whole)
    if syntax.name == "deepseek":
        head, tail, sep = literal(_DS[1]), literal(_DS[2]), literal("<｜tool▁sep｜>")
        if getattr(syntax, "fenced", False):  # V3: function<sep>NAME, then a fenced JSON block
            fence = lark_literal(f"{name}\n```json\n")
            close = lark_literal("\n```")
            return f"{head} {lark_literal('function')} {sep} {fence} {_ARGS} {close} {tail}"
        return f"{head} {lark_literal(name)} {sep} {_ARGS} {tail}"
    if syntax.name == "harmony":
        return (
            f"{literal('<|channel|>')} {lark_literal(f'commentary to=functions.{name} ')} "
            f"{literal('<|constrain|>')} {lark_literal('json')} {literal('<|message|>')} {_ARGS}"
        )
    newline = lark_literal("\n")
    return f"{literal('<tool_call>')} {newline} {json_grammar_of(whole)} {newline} {literal('</tool_call>')}"


class WithTools:
    """A tokenizer whose chat template is always given ``tools`` (``encode_prompt`` passes none).

    Tool descriptions are the client's text as much as messages are: when one spells out an added
    token, the template is applied with ``sanitize_control_tokens`` as for such a message.
    """

    def __init__(self, tokenizer: Any, tools: list[dict]) -> None:
        self._tokenizer = tokenizer
        self._tools = tools
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        text = json.dumps(tools, ensure_ascii=False)
        self._spelled = any(t.content and t.content in text for t in added.values())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def apply_chat_template(
        self, conversation: Any, *, sanitize_control_tokens: bool = False, **kwargs: Any
    ) -> Any:
        """The wrapped tokenizer's, with ``tools``."""
        sanitize = sanitize_control_tokens or self._spelled
        if sanitize:
            kwargs["sanitize_control_tokens"] = True
        return self._tokenizer.apply_chat_template(conversation, tools=self._tools, **kwargs)
