"""Checks of ``serve``'s arguments, made before the model loads so that a typo fails at once.

``check_listen`` binds the address the way asyncio's ``create_server`` (so uvicorn) will, then
releases it: a port out of range, a host that does not resolve, a port in use or one that needs
privileges is one clear error line instead of tracebacks after a long load.
"""

from __future__ import annotations

import errno
import socket

from moe_local.errors import MoeLocalError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
PORT_RANGE = (0, 65535)


def check_log_level(level: str) -> str:
    """Return ``level`` in lower case, or raise ``MoeLocalError`` naming the valid ones."""
    if not isinstance(level, str) or level.lower() not in LOG_LEVELS:
        raise MoeLocalError(f"unknown log level {level!r}; choose one of {', '.join(LOG_LEVELS)}")
    return level.lower()


def check_api_key(api_key: str | None) -> None:
    """Refuse an API key no client could send in an ``Authorization`` header.

    Header values are ASCII in practice and lose their surrounding blanks on the way, so a key
    with other characters, or with blanks at its ends, could never match.

    Raises:
        MoeLocalError: the key is not printable ASCII, or starts or ends with a blank.
    """
    if api_key is None:
        return
    if not api_key or api_key != api_key.strip() or not all(" " <= ch <= "~" for ch in api_key):
        raise MoeLocalError(
            "the API key must be printable ASCII characters with no blank at either end "
            "(clients send it in an HTTP header)"
        )


def check_listen(host: str, port: int) -> None:
    """Check that ``host:port`` can be listened on now: a valid port, a resolvable host, free.

    Every address the host resolves to is bound and released at once, as asyncio binds them
    (``SO_REUSEADDR``, IPv6 sockets IPv6-only, addresses the machine lacks skipped).

    Args:
        host: the address or host name to bind ("" or "0.0.0.0": every interface).
        port: the TCP port (0: any free one).

    Raises:
        MoeLocalError: the port is out of range, the host does not resolve, or no address binds.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not PORT_RANGE[0] <= port <= PORT_RANGE[1]:
        raise MoeLocalError(f"port {port!r} is out of range: pass {PORT_RANGE[0]}-{PORT_RANGE[1]}")
    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        detail = getattr(exc, "strerror", None) or str(exc)
        message = f"cannot listen on {where}: the host {host!r} does not resolve ({detail})"
        raise MoeLocalError(message) from exc
    bound, missing = 0, None
    for family, kind, proto, _, address in dict.fromkeys(infos):
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # a family this machine lacks (asyncio skips it too)
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:  # asyncio skips these; fail only if none binds
                    missing = exc
                    continue
                raise MoeLocalError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
            bound += 1
    if not bound:
        detail = missing.strerror if missing is not None and missing.strerror else "no address to bind"
        raise MoeLocalError(f"cannot listen on {where}: {detail}")
