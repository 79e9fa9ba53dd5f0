"""Fuzzed requests: whatever a client sends, or however it leaves, the answer is a known status in
OpenAI's shape, the server logs no traceback, and no message can open a chat turn of its own.
"""

from __future__ import annotations

import functools
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tests.server.harness import misbehaviours

OK_STATUSES = {200, 400, 404, 413, 422, 429}
SMALL_INT = st.integers(min_value=-3, max_value=4)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
SPELLINGS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<pad>", "<|im_start|>system\n", "<|im_"]
# text that spells out the chat template's tokens; TEXT holds lone surrogates too (JSON "\ud800")
SPELLED = st.lists(st.text(max_size=8) | st.sampled_from(SPELLINGS), max_size=6).map("".join)
TEXT = st.lists(SPELLED | st.characters(categories=["Cs"]), max_size=3).map("".join)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool"])},
    optional={
        "content": st.text(max_size=30) | TEXT | st.builds(lambda t: [{"type": "text", "text": t}], TEXT)
    },
)
# plausible values: mostly valid, sometimes out of range (400) or naming another model (404)
VALID = {
    "model": st.sampled_from(["keyed", "keyed", "keyed", "other"]),
    "max_tokens": st.integers(min_value=0, max_value=4),
    "max_completion_tokens": st.integers(min_value=1, max_value=4),
    "temperature": st.floats(min_value=0, max_value=2.5),
    "top_p": st.floats(min_value=0, max_value=1),
    "n": st.sampled_from([1, 1, 2]),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3),
    "seed": st.integers(min_value=-(2**63), max_value=2**64),
    "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
}
CHAT_FIELDS = {
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(min_value=0, max_value=21),
    "messages": st.lists(MESSAGE, min_size=1, max_size=3),
}
COMPLETION_FIELDS = {
    "logprobs": st.integers(min_value=0, max_value=21),
    "prompt": st.text(min_size=1, max_size=30)
    | st.lists(st.integers(min_value=0, max_value=400), max_size=5),
}


def _with_junk(fields: dict) -> st.SearchStrategy:
    """Bodies whose every field is plausible or, now and then, anything at all."""
    return st.fixed_dictionaries({}, optional={k: v | v | v | JSON for k, v in fields.items()})


def bodies(path: str) -> st.SearchStrategy:
    """Request bodies for ``path``: plausible ones (most often), ones with junk fields, any JSON."""
    own = CHAT_FIELDS if "chat" in path else COMPLETION_FIELDS
    required = {"model": VALID["model"], **{k: v for k, v in own.items() if k in ("messages", "prompt")}}
    optional = {**VALID, **own}
    plausible = st.fixed_dictionaries(
        required, optional={k: v for k, v in optional.items() if k not in required}
    )
    return st.one_of(plausible, plausible, _with_junk(optional), JSON)


def _bounded(body):
    """Keep generations short: the fuzz is about the input, not about long outputs."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > 4:
                body[key] = 4
    return body


SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@SETTINGS
@given(body=bodies("/v1/chat/completions"))
def test_fuzzed_chat_bodies(key_server, body):
    _check(key_server, "/v1/chat/completions", body)


@SETTINGS
@given(body=bodies("/v1/completions"))
def test_fuzzed_completion_bodies(key_server, body):
    _check(key_server, "/v1/completions", body)


def _check(key_server, path: str, body) -> None:
    raw = json.dumps(_bounded(body)).encode()
    resp = httpx.post(key_server.url + path, content=raw, headers=key_server.headers, timeout=60)
    assert resp.status_code in OK_STATUSES, resp.text
    if resp.status_code != 200:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert isinstance(err["message"], str)
        assert "Traceback" not in resp.text
    elif resp.headers["content-type"].startswith("text/event-stream"):
        assert resp.text.rstrip().endswith("data: [DONE]")
    else:
        assert "usage" in resp.json()


ROLE = st.sampled_from(["system", "user", "assistant"])


@SETTINGS
@given(messages=st.lists(st.fixed_dictionaries({"role": ROLE, "content": SPELLED}), min_size=1, max_size=4))
def test_fuzzed_messages_never_open_a_turn(server, tiny_mixtral, messages):
    """The template's markers are the only control tokens: one turn per message, plus the reply's."""
    tok = _tokenizer(str(tiny_mixtral))
    body = {"model": server.model, "messages": messages}
    resp = httpx.post(f"{server.url}/tokenize", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    ids = resp.json()["tokens"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == len(messages) + 1
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == len(messages)
    for special in ("<s>", "</s>", "<pad>"):
        assert tok.convert_tokens_to_ids(special) not in ids


@functools.cache
def _tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize(
    ("which", "with_key"), [(0, True), (1, True), (1, False)], ids=["open", "keyed", "keyed-without-key"]
)
def test_misbehaving_clients_log_no_traceback(servers, which, with_key):
    """Clients that leave mid-body or mid-stream, or send broken HTTP: one line at most, no traceback."""
    server = servers[which]
    headers = server.headers if with_key else {}
    for name, misbehave in misbehaviours(server.model, headers).items():
        misbehave(server.port)
        with server.http() as http:  # still serving, at once
            assert http.get("/health").status_code == 200, name
    time.sleep(0.5)  # the server notices the last departures
    with server.http() as http:
        body = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert server.alarms() == []
