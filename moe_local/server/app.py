"""The FastAPI app factory: routes, OpenAI-shaped errors, API-key check, metrics and life cycle.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status;
an unexpected exception is logged on the server once, with its traceback, and answered 500
without one. A client that disconnects mid-request is a normal event: one log line, no answer.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from h11 import LocalProtocolError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moe_local.server.cors import Cors
from moe_local.server.engine import Engine
from moe_local.server.metrics import RequestCounter
from moe_local.server.protocol import ApiError
from moe_local.server.routes import router

log = logging.getLogger("moe_local.server")
MAX_BODY = 4 * 2**20
OPEN_PATHS = frozenset({"/health"})
_HTTP_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}
# RFC 9110: the auth scheme is case-insensitive ("bearer KEY" is as good as "Bearer KEY")
_BEARER = re.compile(rb"bearer[ \t]+(.*?)[ \t]*", re.IGNORECASE)


def error_response(exc: ApiError) -> JSONResponse:
    """The JSON response of an ``ApiError``."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


class ApiKeyCheck:
    """ASGI middleware: every path but ``/health`` needs ``Authorization: Bearer KEY``.

    Args:
        app: the wrapped ASGI app.
        api_key: the key clients must send.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 401 unless the request carries the key (or is for an open path)."""
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        sent = b""
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                sent = value
        m = _BEARER.fullmatch(sent.strip())
        if m is not None and secrets.compare_digest(m.group(1), self.expected):
            await self.app(scope, receive, send)
            return
        message = "a valid API key is required: send 'Authorization: Bearer KEY'"
        exc = ApiError(401, message, type="authentication_error", code="invalid_api_key")
        await error_response(exc)(scope, receive, send)


class ErrorBoundary:
    """ASGI middleware around the routes: what their exception handlers leave ends here, logged once.

    A client that disconnects before its request is read (``ClientDisconnect``), or whose
    connection cannot take the answer any more (the HTTP server already refused a malformed body),
    gets one log line and no answer: nobody is there to read it. Any other exception is a bug:
    logged with its traceback, answered 500 in OpenAI's shape if the response has not started, and
    not raised further (the HTTP server would log it a second time).

    Args:
        app: the wrapped ASGI app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request; turn what escapes it into one log record (and a 500 when still possible)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            try:
                await send(message)
            except (OSError, LocalProtocolError) as exc:  # the connection is gone or closing (h11 said so)
                raise ClientDisconnect from exc

        where = f"{scope.get('method', '')} {scope.get('path', '')}"
        try:
            await self.app(scope, receive, guarded_send)
        except ClientDisconnect:
            log.info("client disconnected during %s", where)
            if started:  # an answer began but cannot finish: let the HTTP server see the close first
                await _until_disconnected(receive)
        except Exception as exc:
            log.error("unhandled error on %s", where, exc_info=exc)
            if not started:
                await error_response(ApiError(500, "internal server error", type="server_error"))(
                    scope, receive, send
                )


async def _until_disconnected(receive: Receive, wait_s: float = 1.0) -> None:
    """Wait (at most ``wait_s``) until the connection reports its close, reading and dropping the rest.

    Returning before would make uvicorn log "ASGI callable returned without completing response".
    """
    with anyio.move_on_after(wait_s):
        while (await receive())["type"] != "http.disconnect":
            pass


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc if isinstance(exc, ApiError) else ApiError(500, "internal error"))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    if status == 404:
        detail = f"no route {request.method} {request.url.path}"
    return error_response(
        ApiError(status, str(detail), type=_HTTP_TYPES.get(status, "invalid_request_error"))
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    return error_response(ApiError(400, str(first["msg"]), param=param))


def create_app(
    engine: Engine, *, api_key: str | None = None, max_body: int = MAX_BODY, cors_origin: str | None = None
) -> FastAPI:
    """Build the server's ASGI app around an engine (started and stopped with the app).

    Args:
        engine: the generation engine (its model loads when the app starts).
        api_key: when set, every endpoint but ``/health`` needs ``Authorization: Bearer KEY``.
        max_body: largest request body in bytes; larger ones answer 413.
        cors_origin: the browser origin (or ``*``) allowed to call the server; None: no CORS.

    Returns:
        The FastAPI app.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(
        title="moe-local",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.engine = engine
    app.state.max_body = max_body
    app.include_router(router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    if api_key:
        app.add_middleware(ApiKeyCheck, api_key=api_key)
    app.add_middleware(ErrorBoundary)  # around the key check (its answers can fail to send too)
    if cors_origin:  # outside the key check: preflights carry no key, and 401s need the header too
        app.add_middleware(Cors, origin=cors_origin)
    app.add_middleware(RequestCounter, count=engine.metrics.count_request)  # outermost: counts every answer
    return app
