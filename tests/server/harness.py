"""Helpers shared by the server tests: a free port, and raw-socket clients that misbehave."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from collections.abc import Callable

CHAT = "/v1/chat/completions"


def free_port() -> int:
    """A TCP port free on the loopback right now (bound to port 0, then released).

    uvicorn reports no port when asked to bind port 0, so tests pick one this way and pass it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request_head(
    path: str, headers: dict[str, str], length: int | None = None, chunked: bool = False
) -> bytes:
    """The request line and headers of a POST, as bytes."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _send(port: int, data: bytes, *, end: str = "close", read: int = 0, pause_s: float = 0.2) -> bytes:
    """Send ``data``, optionally read ``read`` bytes, then end the connection.

    ``end`` is "close" (FIN), "reset" (RST: SO_LINGER 0) or "half" (shut the writing side, wait for
    the answer). Client-side socket errors are part of the misbehaviour and are swallowed.
    """
    got = b""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        if read:
            got = s.recv(read)
        if end == "half":
            s.shutdown(socket.SHUT_WR)
            got += s.recv(65536)
        time.sleep(pause_s)  # let the server start on the request before the connection goes
        if end == "reset":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return got


def misbehaviours(model: str, headers: dict[str, str]) -> dict[str, Callable[[int], bytes]]:
    """Ways a client can go wrong, by name: each takes the server's port and returns what it read."""
    gen = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40}
    stream = json.dumps({**gen, "stream": True, "ignore_eos": True}).encode()
    whole = json.dumps({**gen, "ignore_eos": True}).encode()
    part = b'{"model": "' + model.encode()
    bad_utf8 = b'{"model": "\xff"}'
    return {
        "closes halfway through its body": lambda p: _send(p, request_head(CHAT, headers, 1000) + part),
        "resets halfway through its body": lambda p: _send(
            p, request_head(CHAT, headers, 1000) + part, end="reset"
        ),
        "shuts its side before the body": lambda p: _send(p, request_head(CHAT, headers, 20), end="half"),
        "sends an invalid chunk": lambda p: _send(
            p, request_head(CHAT, headers, chunked=True) + b'5\r\n{"a":\r\nZZ\r\n', end="reset"
        ),
        "sends garbage": lambda p: _send(p, b"GARBAGE\r\n\r\n", end="half"),
        "sends a huge header": lambda p: _send(
            p, request_head(CHAT, {**headers, "X-Big": "a" * 2**21}, 2) + b"{}", end="half"
        ),
        "sends invalid UTF-8": lambda p: _send(
            p, request_head(CHAT, headers, len(bad_utf8)) + bad_utf8, end="half"
        ),
        "leaves mid-stream": lambda p: _send(p, request_head(CHAT, headers, len(stream)) + stream, read=200),
        "resets mid-stream": lambda p: _send(
            p, request_head(CHAT, headers, len(stream)) + stream, read=200, end="reset"
        ),
        "leaves before its answer": lambda p: _send(p, request_head(CHAT, headers, len(whole)) + whole),
    }
