"""Fixtures: the server run for real, as a subprocess on a free loopback port.

Two servers start in parallel once per session (loading takes most of the time): ``server``
(default options, a custom model name, logging at info level so tests can read its one-line
notices) and ``key_server`` (an API key, ``max_queue=1`` and a 48-token context, for auth,
queue-full and fuzz tests whose generations must stay short). Neither may log a traceback.
``tools_server`` (started on first use) serves a tiny model whose chat template renders tools the
way Qwen's does (``<tool_call>`` JSON), with a 2048-token context and ``--cors-origin``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.harness import free_port

STARTUP_TIMEOUT_S = 120.0
MODEL_NAME = "tiny-moe"
API_KEY = "test-key-123"
CORS_ORIGIN = "http://localhost:3000"
# Qwen2.5's way with tools, shortened: the tiny tokenizer spends a token per byte
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
    "Tools:\n<tools>{% for t in tools %}\n{{ t.function | tojson }}{% endfor %}\n</tools>\n"
    'Call one: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call><|im_end|>\n'
    "{%- elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' and loop.first %}"
    "{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{% for c in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# what a server must never log, whatever clients do: tracebacks, unhandled errors, ASGI misuse
LOG_ALARMS = ("Traceback", "unhandled error", "Exception in ASGI application", "ASGI callable")


@dataclass
class Server:
    """A running server subprocess and how to reach it."""

    proc: subprocess.Popen
    port: int
    log: Path
    model: str
    api_key: str | None = None
    health_seen: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header the server wants (none without a key)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> openai.OpenAI:
        """An official OpenAI client pointed at this server (no retries)."""
        kwargs.setdefault("api_key", self.api_key or "unused")
        return openai.OpenAI(base_url=f"{self.url}/v1", max_retries=0, timeout=60, **kwargs)

    def http(self) -> httpx.Client:
        """A raw HTTP client with the server's base URL and key."""
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60)

    def log_text(self) -> str:
        """What the server printed so far."""
        return self.log.read_text(errors="replace")

    def alarms(self) -> list[str]:
        """The log lines a server must never print (see ``LOG_ALARMS``)."""
        return [line for line in self.log_text().splitlines() if any(a in line for a in LOG_ALARMS)]

    def wait_for_log(self, needle: str, timeout: float = 5.0) -> bool:
        """Whether ``needle`` appears in the log within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while needle not in self.log_text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


def _start(
    model: Path, log: Path, name: str, *args: str, api_key: str | None = None, log_level: str = "warning"
) -> Server:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "moe_local.server",
        str(model),
        "--port",
        str(port),
        "--log-level",
        log_level,
    ]
    cmd += ["--model-name", name, *args]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "MOE_LOCAL_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = log.open("w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    out.close()
    return Server(proc, port, log, name, api_key)


def _wait_ready(server: Server, deadline: float) -> None:
    with httpx.Client(timeout=5) as http:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                pytest.fail(f"server exited with {server.proc.returncode}:\n{server.log_text()}")
            try:
                status = http.get(f"{server.url}/health").status_code
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            server.health_seen.append(status)
            if status == 200:
                return
            time.sleep(0.2)
    pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{server.log_text()}")


def _stop(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def servers(tiny_mixtral, tmp_path_factory) -> Iterator[tuple[Server, Server]]:
    """Both servers, started together and stopped at the end of the session."""
    logs = tmp_path_factory.mktemp("server-logs")
    main = _start(tiny_mixtral, logs / "main.log", MODEL_NAME, log_level="info")
    keyed = _start(
        tiny_mixtral, logs / "keyed.log", "keyed", "--max-queue", "1", "--context", "48", api_key=API_KEY
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        _wait_ready(main, deadline)
        _wait_ready(keyed, deadline)
        yield main, keyed
    finally:
        _stop(main)
        _stop(keyed)
    for s in (main, keyed):
        if any(needle in s.log_text() for needle in LOG_ALARMS):
            pytest.fail(f"the server logged a traceback or an error of its own:\n{s.log_text()}")


@pytest.fixture(scope="session")
def server(servers) -> Server:
    """The server with default options (model name ``tiny-moe``)."""
    return servers[0]


@pytest.fixture(scope="session")
def key_server(servers) -> Server:
    """The server with an API key, max_queue=1 and a 48-token context."""
    return servers[1]


def tools_checkpoint(folder: Path, tmp: Path) -> Path:
    """A copy of a tiny checkpoint whose chat template renders tools (``TOOLS_TEMPLATE``)."""
    from transformers import AutoTokenizer

    out = tmp / "tiny-tools"
    shutil.copytree(folder, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = TOOLS_TEMPLATE
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tools_server(tiny_checkpoint, tmp_path_factory) -> Iterator[Server]:
    """A server of a tiny model with a tool-rendering template, a 2048-token context and CORS on."""
    tmp = tmp_path_factory.mktemp("tools")
    model = tools_checkpoint(tiny_checkpoint("mixtral", max_position_embeddings=2048), tmp)
    server = _start(model, tmp / "tools.log", "tiny-tools", "--cors-origin", CORS_ORIGIN, log_level="info")
    try:
        _wait_ready(server, time.monotonic() + STARTUP_TIMEOUT_S)
        yield server
    finally:
        _stop(server)
    if server.alarms():
        pytest.fail(f"the server logged a traceback or an error of its own:\n{server.log_text()}")
