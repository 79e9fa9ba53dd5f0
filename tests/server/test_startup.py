"""Starting the server: a model that cannot load, or an address it cannot listen on, is one error line."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from moe_local.errors import MoeLocalError
from moe_local.server import serve
from tests.server.harness import free_port


def test_unloadable_model_stops_the_server_with_an_error(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_local.server",
            str(missing),
            "--port",
            str(free_port()),
            "--log-level",
            "critical",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: cannot load")
    assert "no such model folder" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_a_port_out_of_range_fails_before_loading(tmp_path):
    """The model folder does not exist: had the server started loading, that would be the error."""
    proc = subprocess.run(
        [sys.executable, "-m", "moe_local.server", str(tmp_path / "no-such-model"), "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "error: port 70000 is out of range: pass 0-65535"
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": -1}, "port -1 is out of range"),
        ({"port": "8000"}, "port '8000' is out of range"),
        ({"host": "no-such-host.invalid"}, "the host 'no-such-host.invalid' does not resolve"),
        ({"host": "192.0.2.1"}, "cannot listen on 192.0.2.1:"),  # TEST-NET-1: on no machine
        ({"log_level": "loud"}, "unknown log level 'loud'; choose one of critical"),
        ({"api_key": " key"}, "the API key must be printable ASCII"),
        ({"api_key": "k\u00e9y"}, "the API key must be printable ASCII"),
        ({"cors_origin": "localhost:3000/app"}, "--cors-origin 'localhost:3000/app' is not an origin"),
    ],
)
def test_serve_checks_its_arguments_before_loading(tmp_path, kwargs, message):
    with pytest.raises(MoeLocalError, match=re.escape(message)):
        serve(tmp_path / "no-such-model", **{"port": free_port(), **kwargs})


def test_a_port_in_use_fails_before_loading(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MoeLocalError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            serve(tmp_path / "no-such-model", port=port)


def test_a_bad_cors_origin_fails_before_loading(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_local.server",
            str(tmp_path / "no-such-model"),
            "--cors-origin",
            "http://a/b",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --cors-origin 'http://a/b' is not an origin")


def test_health_answers_503_while_loading_then_200(tiny_mixtral):
    """Loading is held open by the engine's ``prepare`` step, so the 503 does not depend on timing."""
    import asyncio
    import threading
    import time

    import httpx

    from moe_local.config import LoadOptions
    from moe_local.server.app import create_app
    from moe_local.server.engine import Engine, State

    gate = threading.Event()

    def prepare():
        gate.wait(60)
        return tiny_mixtral, LoadOptions()

    engine = Engine(tiny_mixtral, prepare=prepare, model_name="tiny")
    app = create_app(engine)

    async def health() -> tuple[int, dict]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            resp = await http.get("/health")
            return resp.status_code, resp.json()

    engine.start()
    try:
        status, body = asyncio.run(health())
        assert status == 503
        assert body["status"] == "loading"
        gate.set()
        deadline = time.monotonic() + 60
        while engine.state is State.LOADING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert asyncio.run(health()) == (200, {"status": "ready", "model": "tiny"})
    finally:
        gate.set()
        engine.stop()
