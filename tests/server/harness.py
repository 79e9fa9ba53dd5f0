"""Helpers shared by the server tests."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on the loopback right now (bound to port 0, then released).

    uvicorn reports no port when asked to bind port 0, so tests pick one this way and pass it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
