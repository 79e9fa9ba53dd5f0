"""CORS for one origin (``--cors-origin``), off by default: what browser apps need to call the server.

A browser asks first (an ``OPTIONS`` preflight with ``Access-Control-Request-Method``) before a
cross-origin POST with JSON or an ``Authorization`` header. For the configured origin (or any
origin with ``*``) the preflight is answered 204 with the ``Access-Control-*`` headers, before the
API-key check (browsers send no credentials on a preflight), and every answer to that origin
carries ``Access-Control-Allow-Origin`` so the page can read it, errors included. A preflight from
another origin is a 403 in OpenAI's error shape; other requests from it get no CORS headers, so the
browser withholds the answer from the page. Without ``--cors-origin`` nothing changes.
"""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moe_local.errors import MoeLocalError

ALLOW_METHODS = "GET, POST, OPTIONS"
DEFAULT_HEADERS = "Authorization, Content-Type"
MAX_AGE_S = "600"
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
_HEADER_LIST = re.compile(r"[A-Za-z0-9\-]+(\s*,\s*[A-Za-z0-9\-]+)*")


def check_cors_origin(origin: str | None) -> str | None:
    """Return the origin if it is ``*`` or ``scheme://host[:port]`` (no path, no trailing slash).

    Raises:
        MoeLocalError: anything else, with the form it should take.
    """
    if origin is None or origin == "*" or _ORIGIN.fullmatch(origin):
        return origin
    raise MoeLocalError(
        f"--cors-origin {origin!r} is not an origin: give scheme://host[:port] "
        "(e.g. http://localhost:3000, no path) or * for any origin"
    )


class Cors:
    """ASGI middleware: CORS headers and preflight answers for one origin (or ``*``).

    Args:
        app: the wrapped ASGI app.
        origin: the allowed origin, or ``*`` for any.
    """

    def __init__(self, app: ASGIApp, origin: str) -> None:
        self.app = app
        self.origin = origin

    def _allowed(self, origin: str | None) -> bool:
        return origin is not None and (self.origin == "*" or origin == self.origin)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer preflights; add ``Access-Control-Allow-Origin`` to answers for the allowed origin."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get(b"origin")
        if (
            scope.get("method") == "OPTIONS"
            and origin is not None
            and b"access-control-request-method" in headers
        ):
            await self._preflight(origin, headers.get(b"access-control-request-headers"))(
                scope, receive, send
            )
            return
        if not self._allowed(origin):
            await self.app(scope, receive, send)
            return
        extra = [
            (
                b"access-control-allow-origin",
                (self.origin if self.origin == "*" else origin).encode("latin-1"),
            ),
            (b"vary", b"Origin"),
        ]

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_cors)

    def _preflight(self, origin: str, requested: str | None) -> Response:
        if not self._allowed(origin):
            body = {
                "error": {
                    "message": f"origin {origin[:200]!r} may not call this server (see --cors-origin)",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "cors_origin_not_allowed",
                }
            }
            return JSONResponse(body, status_code=403, headers={"Vary": "Origin"})
        allow_headers = requested.strip() if requested and _HEADER_LIST.fullmatch(requested.strip()) else None
        return Response(
            status_code=204,
            headers={
                "Access-Control-Allow-Origin": origin if self.origin != "*" else "*",
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": allow_headers or DEFAULT_HEADERS,
                "Access-Control-Max-Age": MAX_AGE_S,
                "Vary": "Origin",
            },
        )
