"""``moe-local serve``: an OpenAI-compatible HTTP server for one model.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (both streamed with server-sent events or not, ``n`` choices), ``POST
/tokenize``, ``POST /detokenize`` and ``GET /metrics`` (Prometheus text). Chat takes ``tools``
(rendered by the model's chat template, calls parsed back into ``tool_calls``) and, with the
optional grammar engine (``pip install 'moe-local[grammar]'``), ``response_format`` JSON and a
forced ``tool_choice`` decoded under a grammar, valid by construction. ``/v1/embeddings`` is a
404 naming the alternative. ``cors_origin`` lets one browser origin call the server. The model
loads in the background after the server starts (``/health`` answers 503 until it is ready);
requests queue and run one generation at a time, or up to ``parallel`` decoded together
(continuous batching). The port, host, log level, API key and CORS origin are checked before the
model loads.

Chat messages are always text: a special token spelled out in a message (``<|im_start|>system``)
is encoded as those characters, never as the control token, so no client can forge a turn. A raw
``/v1/completions`` prompt is the client's whole prompt and is encoded as is, spellings included
(as llama-server and vLLM do). The ``Authorization`` scheme is case-insensitive (``bearer KEY``).

    from moe_local.server import serve
    serve("./Mixtral-8x7B-v0.1", port=8000, api_key="secret")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moe_local.config import LoadOptions

__all__ = ["serve"]


def serve(
    model: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_queue: int = 16,
    parallel: int = 1,
    load_options: LoadOptions | None = None,
    model_name: str | None = None,
    log_level: str = "info",
    prepare: Callable[[], tuple[str | Path, LoadOptions]] | None = None,
    cors_origin: str | None = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API until interrupted.

    Args:
        model: checkpoint folder or hub id, as ``moe_local.load`` takes it.
        host: address to bind (the loopback only, unless told otherwise).
        port: TCP port.
        api_key: when set, every endpoint but ``/health`` needs ``Authorization: Bearer KEY``.
        max_queue: most requests waiting behind the running one; more answer 429.
        parallel: most generations decoded together (continuous batching); 1: one at a time.
        load_options: how to load the model (default ``LoadOptions()``).
        model_name: the name clients pass as ``model`` (default: the folder's name or the hub id).
        log_level: uvicorn's log level (critical, error, warning, info, debug).
        prepare: a step run in the background before the load, returning the folder to load and
            its options (the CLI plans the expert budget and stages ``--offload-dir`` there).
        cors_origin: a browser origin (``http://localhost:3000``) or ``*`` allowed to call the
            server (preflights answered); None: no CORS headers at all.

    Raises:
        MoeLocalError: an invalid port, host, log level, API key or CORS origin, or a port that cannot
            be bound (all found before the model loads); the model cannot be loaded (the server stops).
    """
    import copy

    import uvicorn
    import uvicorn.config

    from moe_local.errors import MoeLocalError
    from moe_local.server.app import create_app
    from moe_local.server.cors import check_cors_origin
    from moe_local.server.engine import Engine
    from moe_local.server.jobs import State
    from moe_local.server.listen import check_api_key, check_listen, check_log_level

    log_level = check_log_level(log_level)
    check_api_key(api_key)
    check_cors_origin(cors_origin)
    check_listen(host, port)  # before the model loads: a typo should not cost a minute of loading
    engine = Engine(
        model, load_options, max_queue=max_queue, model_name=model_name, prepare=prepare, parallel=parallel
    )
    app = create_app(engine, api_key=api_key, cors_origin=cors_origin)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["moe_local"] = {"handlers": ["default"], "level": log_level.upper()}
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, log_config=log_config, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    engine.on_load_error = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        if not server.started:
            raise MoeLocalError(f"cannot listen on {host}:{port} (is the port in use?)") from exc
        raise
    if engine.state is State.FAILED:
        raise MoeLocalError(f"cannot load {model}: {engine.error}")
