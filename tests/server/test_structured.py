"""Tools, structured output, ``n`` and CORS through the official ``openai`` client and raw HTTP.

The tiny model is random: whatever it writes unconstrained is junk, so every forced call and
every JSON reply below is valid only because the grammar makes it so.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from moe_local.grammar import available
from tests.server.conftest import CORS_ORIGIN

needs_grammar = pytest.mark.skipif(not available(), reason="llguidance (moe-local[grammar]) is not installed")
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather of a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
SAMPLED = dict(temperature=1.0, seed=7, max_tokens=400)


def _validate(instance, schema) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(instance, schema)


@needs_grammar
def test_a_named_tool_choice_returns_a_call_matching_the_schema(tools_server):
    resp = tools_server.client().chat.completions.create(
        model=tools_server.model,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        **SAMPLED,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    _validate(json.loads(call.function.arguments), WEATHER)


@needs_grammar
def test_required_tool_choice_streams_the_call_as_deltas(tools_server):
    kwargs = dict(model=tools_server.model, messages=ASK, tools=TOOLS, tool_choice="required", **SAMPLED)
    kwargs["parallel_tool_calls"] = False  # one call (required alone may make several)
    chunks = list(tools_server.client().chat.completions.create(**kwargs, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas, "no tool call was streamed"
    assert {d.index for d in deltas} == {0}
    assert deltas[0].id.startswith("call_")
    name = "".join(d.function.name or "" for d in deltas)
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert name in ("get_weather", "add")
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)
    _validate(json.loads(arguments), schema)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]
    whole = tools_server.client().chat.completions.create(**kwargs)
    assert whole.choices[0].message.tool_calls[0].function.name == name
    assert whole.choices[0].message.tool_calls[0].function.arguments == arguments


@needs_grammar
def test_required_tool_choice_may_make_several_calls_each_valid(tools_server):
    """The official client's own stream accumulation ends with the non-streamed answer's calls."""
    kwargs = dict(model=tools_server.model, messages=ASK, tools=TOOLS, tool_choice="required", **SAMPLED)
    client = tools_server.client()
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and len(whole.message.tool_calls) > 1  # seed 7: two
    for call in whole.message.tool_calls:
        schema = next(
            t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name
        )
        _validate(json.loads(call.function.arguments), schema)
    assert len({c.id for c in whole.message.tool_calls}) == len(whole.message.tool_calls)
    pieces: dict[int, list[str]] = {}
    with client.chat.completions.stream(**kwargs) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                pieces.setdefault(event.index, []).append(event.arguments_delta)
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    got = [(c.function.name, c.function.arguments) for c in final.message.tool_calls]
    assert got == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert sorted(pieces) == list(range(len(got)))
    assert all("".join(pieces[i]) == got[i][1] for i in pieces)
    one = client.chat.completions.create(**kwargs, parallel_tool_calls=False).choices[0]
    assert len(one.message.tool_calls) == 1


@needs_grammar
def test_a_long_argument_arrives_in_many_pieces_over_raw_sse(tools_server):
    body = {
        "model": tools_server.model,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        **SAMPLED,
    }
    with tools_server.http() as http:
        whole = http.post("/v1/chat/completions", json=body).json()
        [call] = whole["choices"][0]["message"]["tool_calls"]
        deltas = []
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    for choice in chunk["choices"]:
                        deltas += choice["delta"].get("tool_calls") or []
    assert deltas[0]["id"].startswith("call_")
    assert deltas[0]["type"] == "function" and deltas[0]["function"]["name"] == "get_weather"
    fragments = [d["function"]["arguments"] for d in deltas if d["function"]["arguments"]]
    assert len(fragments) > 1 and len(call["function"]["arguments"]) > 20
    assert "".join(fragments) == call["function"]["arguments"]
    json.loads(call["function"]["arguments"])
    assert all(d["index"] == 0 for d in deltas) and all(set(d) == {"index", "function"} for d in deltas[1:])


@needs_grammar
def test_json_schema_output_validates(tools_server):
    schema = {**WEATHER, "properties": {**WEATHER["properties"], "ok": {"type": "boolean"}}}
    resp = tools_server.client().chat.completions.create(
        model=tools_server.model,
        messages=ASK,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}},
        **SAMPLED,
    )
    assert resp.choices[0].finish_reason == "stop"
    _validate(json.loads(resp.choices[0].message.content), schema)


@needs_grammar
def test_json_object_output_is_a_json_object(tools_server):
    resp = tools_server.client().chat.completions.create(
        model=tools_server.model,
        messages=ASK,
        response_format={"type": "json_object"},
        **{**SAMPLED, "max_tokens": 600},
    )
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(resp.choices[0].message.content), dict)
    else:  # the budget ran out first: what came is still the start of an object
        assert resp.choices[0].message.content.startswith("{")


@needs_grammar
def test_a_schema_the_engine_cannot_take_is_one_400(tools_server):
    with pytest.raises(openai.BadRequestError) as err:
        tools_server.client().chat.completions.create(
            model=tools_server.model,
            messages=ASK,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
        )
    assert err.value.body["param"] == "response_format"
    assert "\n" not in err.value.body["message"]


def test_n_choices_have_their_own_seeds_and_summed_usage(tools_server):
    client = tools_server.client()
    kwargs = dict(model=tools_server.model, messages=ASK, temperature=1.0, seed=3, max_tokens=8)
    resp = client.chat.completions.create(**kwargs, n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.completion_tokens == 16
    first = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert resp.choices[0].message.content == first.choices[0].message.content
    assert resp.choices[0].message.content != resp.choices[1].message.content
    chunks = list(client.chat.completions.create(**kwargs, n=2, stream=True, extra_body={"ignore_eos": True}))
    for i in (0, 1):
        text = "".join(
            c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i
        )
        assert text == resp.choices[i].message.content
    done = client.completions.create(
        model=tools_server.model, prompt="Hi", max_tokens=4, n=3, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert done.usage.completion_tokens == 12


def test_tool_turns_go_back_through_the_template(tools_server):
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    resp = tools_server.client().chat.completions.create(
        model=tools_server.model, messages=messages, tools=TOOLS, max_tokens=4, temperature=0
    )
    assert resp.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the template wrote the earlier call and the result into the prompt
    short = tools_server.client().chat.completions.create(
        model=tools_server.model, messages=messages[:1], tools=TOOLS, max_tokens=1, temperature=0
    )
    added = len('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert resp.usage.prompt_tokens > short.usage.prompt_tokens + added
    # and the tools themselves: the template lists each function's schema
    bare = tools_server.client().chat.completions.create(
        model=tools_server.model, messages=messages[:1], max_tokens=1, temperature=0
    )
    assert short.usage.prompt_tokens > bare.usage.prompt_tokens + len(json.dumps(WEATHER))


def test_unknown_tool_choice_and_embeddings_are_clear_errors(tools_server):
    client = tools_server.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=tools_server.model,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "missing"}},
        )
    assert err.value.body["param"] == "tool_choice"
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model=tools_server.model, input="hello")
    assert "embedding model" in err.value.message


def test_cors_preflight_answers_the_configured_origin_only(tools_server):
    with httpx.Client(base_url=tools_server.url, timeout=30) as http:
        ask = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        ok = http.options("/v1/chat/completions", headers={"Origin": CORS_ORIGIN, **ask})
        assert ok.status_code == 204
        assert ok.headers["access-control-allow-origin"] == CORS_ORIGIN
        assert "POST" in ok.headers["access-control-allow-methods"]
        assert ok.headers["access-control-allow-headers"] == "authorization, content-type"
        other = http.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **ask})
        assert other.status_code == 403
        assert "access-control-allow-origin" not in other.headers
        got = http.get("/v1/models", headers={"Origin": CORS_ORIGIN})
        assert got.headers["access-control-allow-origin"] == CORS_ORIGIN
        assert (
            "access-control-allow-origin"
            not in http.get("/v1/models", headers={"Origin": "http://x.y"}).headers
        )


def test_cors_is_off_by_default(server):
    with server.http() as http:
        resp = http.options(
            "/v1/chat/completions", headers={"Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST"}
        )
        assert resp.status_code == 405
        assert "access-control-allow-origin" not in resp.headers


def test_without_the_grammar_engine_constraints_are_one_line_400s(tiny_lm, monkeypatch):
    """The engine's compile step, as the routes call it, with llguidance made unimportable."""
    import sys

    from moe_local.server.engine import Engine
    from moe_local.server.jobs import State
    from moe_local.server.protocol import ApiError

    engine = Engine(tiny_lm.path)
    engine.lm, engine._tokenizer, engine.state = tiny_lm, tiny_lm.tokenizer, State.READY
    monkeypatch.setitem(sys.modules, "llguidance", None)
    for what in ("response_format", "tool_choice"):
        with pytest.raises(ApiError) as err:
            engine.grammar(schema={"type": "object"}, what=what)
        assert err.value.status == 400 and err.value.param == what
        assert err.value.code == "grammar_unavailable"
        assert "\n" not in err.value.message and "pip install 'moe-local[grammar]'" in err.value.message
