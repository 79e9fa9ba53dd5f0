"""The app in-process, over raw ASGI: failing chat templates, clients that leave, and bugs, as logged.

These drive the ASGI app directly (no sockets) so that the exact log records can be checked: each
event is one record, and only a bug carries a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time

import pytest

from moe_local.server.app import create_app
from moe_local.server.engine import Engine
from moe_local.server.jobs import State

# raise_exception() refuses a conversation (the client's fault); the sandbox stops anything else
HOSTILE = (
    "{% if messages[0]['content'] == 'refuse' %}{{ raise_exception('roles must alternate') }}{% endif %}"
    "{{ ''.__class__.__mro__[1].__subclasses__() }}"
)
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def engine(tiny_mixtral, tmp_path_factory):
    """An engine serving a copy of the tiny model whose chat template is hostile."""
    model = shutil.copytree(tiny_mixtral, tmp_path_factory.mktemp("hostile") / "hostile")
    (model / "chat_template.jinja").write_text(HOSTILE)
    engine = Engine(model)
    engine.start()
    deadline = time.monotonic() + 60
    while engine.state is State.LOADING and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.state is State.READY, engine.error
    yield engine
    engine.stop()


def _scope(path: str, body: bytes) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


def call(app, path: str, body: bytes, *, parts: list[dict] | None = None, send_fails: bool = False):
    """Run one request through the app; return (status, JSON body or None, messages sent)."""
    incoming = parts if parts is not None else [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if send_fails:
            raise OSError("connection reset by peer")
        sent.append(message)

    asyncio.run(app(_scope(path, body), receive, send))
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return (start["status"] if start else None), (json.loads(data) if data else None), sent


def _records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(("moe_local", "uvicorn"))]


def _chat(content: str) -> bytes:
    return json.dumps({"model": "hostile", "messages": [{"role": "user", "content": content}]}).encode()


@pytest.mark.parametrize("path", [CHAT, "/tokenize"])
def test_a_hostile_template_is_a_500_and_one_log_line(engine, caplog, path):
    caplog.set_level(logging.INFO)
    status, body, _ = call(create_app(engine), path, _chat("hi"))
    assert status == 500
    err = body["error"]
    assert err["type"] == "server_error" and err["code"] == "chat_template_error"
    assert err["message"].startswith(
        "the chat template of hostile failed: SecurityError: access to attribute"
    )
    records = _records(caplog)
    assert [r.getMessage() for r in records] == [err["message"]]
    assert records[0].levelno == logging.ERROR and records[0].exc_info is None


def test_messages_the_template_refuses_are_a_400(engine, caplog):
    caplog.set_level(logging.INFO)
    status, body, _ = call(create_app(engine), CHAT, _chat("refuse"))
    assert status == 400
    assert body["error"]["message"] == "the chat template of hostile failed: roles must alternate"
    assert body["error"]["code"] == "chat_template_refused"
    assert _records(caplog) == []


def test_a_client_gone_mid_body_is_one_info_line(engine, caplog):
    caplog.set_level(logging.INFO)
    parts = [
        {"type": "http.request", "body": b'{"model": "hos', "more_body": True},
        {"type": "http.disconnect"},
    ]
    status, _, sent = call(create_app(engine), CHAT, b"x" * 100, parts=parts)
    assert status is None and sent == []  # nobody to answer
    records = _records(caplog)
    assert [r.getMessage() for r in records] == [f"client disconnected during POST {CHAT}"]
    assert records[0].levelno == logging.INFO and records[0].exc_info is None


def test_a_connection_that_cannot_take_the_answer_is_one_info_line(engine, caplog):
    caplog.set_level(logging.INFO)
    status, _, _ = call(create_app(engine), CHAT, _chat("refuse"), send_fails=True)
    assert status is None
    assert [r.getMessage() for r in _records(caplog)] == [f"client disconnected during POST {CHAT}"]


def test_a_bug_is_a_500_with_one_traceback_and_is_not_raised_on(engine, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    app = create_app(engine)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine, "encode", broken)
    status, body, _ = call(app, CHAT, _chat("hi"))  # returns: the HTTP server would log it again
    assert status == 500
    assert body["error"] == {
        "message": "internal server error",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    records = _records(caplog)
    assert [r.getMessage() for r in records] == [f"unhandled error on POST {CHAT}"]
    assert records[0].exc_info is not None and "a bug" in str(records[0].exc_info[1])
