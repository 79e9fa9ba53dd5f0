"""HTTP endpoints: health, models, chat and text completions, tokenize, detokenize and metrics.

``/v1/embeddings`` answers 404 on purpose, naming the alternative: a generative MoE's pooled
hidden states are not trained as embeddings (retrieval with them is poor, and a user would not
know), and each embedding would cost a full pass through the offloaded experts, queued behind
the chats. A small embedding model served beside this one is both better and cheaper.

Bodies are read here (capped at the app's ``max_body``), parsed as strict JSON and validated with
the pydantic models of ``protocol``; every failure becomes an ``ApiError`` answered in OpenAI's
error shape by the app's handlers.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from moe_local.config import SamplingParams
from moe_local.errors import MoeLocalError
from moe_local.server.engine import Engine
from moe_local.server.jobs import Job, State, Step
from moe_local.server.metrics import CONTENT_TYPE
from moe_local.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from moe_local.server.render import ChatRenderer, CompletionRenderer, finish_of, usage_of
from moe_local.server.tool_calls import ToolSyntax
from moe_local.server.tools import (
    call_grammar,
    check_tools,
    fallback_system,
    forced_names,
    template_messages,
    template_reads,
)

router = APIRouter()
M = TypeVar("M", bound=BaseModel)
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.25
MIN_TEMPERATURE = 1e-5
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
EMBEDDINGS_404 = (
    "this server does not make embeddings: a chat model's hidden states are poor embeddings; serve an "
    "embedding model beside it (e.g. llama-server --embedding, or text-embeddings-inference with "
    "BAAI/bge-small-en-v1.5) and point the client's embeddings base_url there"
)


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, model: type[M]) -> M:
    """Read the body (at most the app's ``max_body`` bytes) and validate it as ``model``.

    Args:
        request: the HTTP request.
        model: the pydantic model of the body.

    Returns:
        The validated body.

    Raises:
        ApiError: 413 for a body over the limit, 400 for malformed JSON or invalid fields.
    """
    limit: int = request.app.state.max_body
    too_big = ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(bytes(body), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        detail = str(exc).splitlines()[0][:200] if isinstance(exc, ValueError) else "nested too deeply"
        raise ApiError(400, f"the body is not valid JSON: {detail}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc
    except RecursionError as exc:
        raise ApiError(400, "the body is nested too deeply", code="invalid_json") from exc


def _param_of(loc: tuple[int | str, ...]) -> str | None:
    """The field a pydantic error location points at, without union member tags (``stop.str``)."""
    parts = [
        str(p) for p in loc if isinstance(p, int) or not (p in _TYPE_TAGS or "[" in p or p[:1].isupper())
    ]
    return ".".join(parts) or None


def validation_error(exc: ValidationError) -> ApiError:
    """A 400 naming the first invalid field and what each accepted form of it wanted."""
    errors = exc.errors(include_url=False, include_input=False)
    param = _param_of(errors[0]["loc"])
    wanted = list(dict.fromkeys(e["msg"] for e in errors if _param_of(e["loc"]) == param))[:3]
    where = f"{param}: " if param else ""
    return ApiError(400, where + "; or ".join(wanted), param=param, code=errors[0]["type"])


def _params(
    req: ChatCompletionRequest | CompletionRequest, max_tokens: int, top_logprobs: int
) -> SamplingParams:
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0 or temperature < MIN_TEMPERATURE:  # both mean: the most likely token, i.e. greedy
        temperature, top_p = 0.0, 1.0  # (and logits / 1e-40 would overflow float32)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed,
            stop=req.stop_strings(),
            ignore_eos=bool(req.ignore_eos),
            logprobs=top_logprobs,
        )
    except MoeLocalError as exc:
        raise ApiError(400, str(exc)) from exc


async def _collect(job: Job, request: Request) -> list[list[Step]] | None:
    """Gather a job's steps per choice; cancel it and return None if the client disconnects meanwhile."""
    choices: list[list[Step]] = [[] for _ in range(job.n)]

    async def drain() -> list[list[Step]]:
        async for step in job.steps():
            choices[step.index].append(step)
        return choices

    task = asyncio.ensure_future(drain())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                job.cancel()
                return None
    finally:
        if not task.done():  # the client left, or this handler itself was cancelled
            task.cancel()
            job.cancel()


async def _stream(
    job: Job, renderer: ChatRenderer | CompletionRenderer, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events of a job; stopping early (the client left) cancels the generation.

    The choices come one after another; each ends with its finish reason before the next starts.
    """
    choices: list[list[Step]] = [[] for _ in range(job.n)]
    try:
        for chunk in renderer.start():
            yield chunk
        async for step in job.steps():
            choices[step.index].append(step)
            for chunk in renderer.chunks(step):
                yield chunk
            if step.finish_reason is not None:
                for chunk in renderer.end(step.index, step.finish_reason):
                    yield chunk
    except ApiError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"
        return
    finally:
        job.cancel()  # no-op after a normal end; stops the worker if the client went away
    for index, steps in enumerate(choices):
        if not steps or steps[-1].finish_reason is None:  # a choice that never got its last step
            for chunk in renderer.end(index, finish_of(steps)):
                yield chunk
    for chunk in renderer.close(usage_of(choices, renderer.prompt_tokens), include_usage):
        yield chunk


async def _generate(
    request: Request,
    req: ChatCompletionRequest | CompletionRequest,
    prompt_ids: list[int],
    params: SamplingParams,
    renderer: ChatRenderer | CompletionRenderer,
    grammar: str | None = None,
    raw_skip: frozenset[int] | None = None,
) -> Response:
    engine = _engine(request)
    job = engine.submit(
        prompt_ids, params, logprobs=renderer.logprobs, n=renderer.n, grammar=grammar, raw_skip=raw_skip
    )
    if req.stream:
        stream = _stream(job, renderer, req.include_usage())
        weakref.finalize(stream, job.cancel)  # covers a client gone before the first chunk was pulled
        return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
    choices = await _collect(job, request)
    if choices is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    return JSONResponse(renderer.whole(choices).model_dump())


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 once the model is loaded; 503 while it loads or if loading failed."""
    engine = _engine(request)
    body: dict[str, Any] = {"status": engine.state.value, "model": engine.name}
    if engine.state is State.FAILED:
        body["error"] = engine.error
    return JSONResponse(body, status_code=200 if engine.state is State.READY else 503)


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    """The one model this server serves."""
    engine = _engine(request)
    return ModelList(data=[ModelCard(id=engine.name, created=engine.created)])


@router.get("/v1/models/{model:path}")
async def get_model(request: Request, model: str) -> ModelCard:
    """The served model's card; 404 for any other name."""
    engine = _engine(request)
    engine.check_model(model)
    return ModelCard(id=engine.name, created=engine.created)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completions, streamed or not: tools, ``response_format`` and ``n`` included."""
    engine = _engine(request)
    req = await read_json(request, ChatCompletionRequest)
    engine.check_model(req.model)
    req.check_supported()
    schema = req.json_schema()
    engine.require_ready()
    tools = check_tools(req.tools) if req.tools and req.tool_choice != "none" else []
    syntax = engine.tool_syntax() if tools else None
    messages = _messages(engine, req, tools, syntax)
    ids = await run_in_threadpool(engine.encode, messages, chat=True, tools=_template_tools(engine, tools))
    engine.check_length(len(ids), "messages")
    grammar = None
    forced = forced_names(req.tool_choice, tools) if syntax is not None else None
    if forced:
        several = req.tool_choice == "required" and req.parallel_tool_calls is not False
        lark = call_grammar(syntax, tools, forced, engine.literal, parallel=several)
        grammar = await run_in_threadpool(engine.grammar, lark=lark, what="tool_choice")
    elif schema is not None:
        grammar = await run_in_threadpool(engine.grammar, schema=schema, what="response_format")
    top = req.top_logprobs or 0
    params = _params(req, req.token_limit() or engine.lm.context, top)
    one_call = req.parallel_tool_calls is False
    n = req.n or 1
    renderer = ChatRenderer(engine.name, len(ids), bool(req.logprobs), n, syntax, params.stop, one_call)
    raw_skip = engine.raw_skip(syntax) if syntax is not None else None
    return await _generate(request, req, ids, params, renderer, grammar, raw_skip)


def _template_tools(engine: Engine, tools: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The tools for the chat template: None when it does not read them (they are in a system turn)."""
    return tools if tools and template_reads(engine.chat_template(), "tools") else None


def _messages(
    engine: Engine, req: ChatCompletionRequest, tools: list[dict[str, Any]], syntax: ToolSyntax | None
) -> list[dict[str, Any]]:
    """The messages for the chat template, with tool calls and results; tools described if it cannot."""
    if syntax is None:
        plain = [{"role": m.role, "content": m.text()} for m in req.messages]
        if not any(m.tool_calls or m.role == "tool" for m in req.messages):
            return plain
    template = engine.chat_template()
    syntax = syntax or engine.tool_syntax()
    messages = template_messages(
        req.messages, syntax, calls_in_template=template_reads(template, "tool_calls")
    )
    if tools and not template_reads(template, "tools"):
        messages = fallback_system(messages, tools)
    return messages


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    """OpenAI (legacy) text completions, streamed or not; the prompt is used as is.

    No chat template, and special-token spellings in the prompt are those tokens: a raw prompt is
    wholly the client's, as in llama-server and vLLM.
    """
    engine = _engine(request)
    req = await read_json(request, CompletionRequest)
    engine.check_model(req.model)
    req.check_supported()
    engine.require_ready()
    ids = await run_in_threadpool(engine.encode, req.single_prompt(), chat=False)
    engine.check_length(len(ids), "prompt")
    params = _params(req, req.max_tokens or COMPLETIONS_MAX_TOKENS, req.logprobs or 0)
    renderer = CompletionRenderer(engine.name, len(ids), req.logprobs is not None, req.n or 1)
    return await _generate(request, req, ids, params, renderer)


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    """Not served here, on purpose (see the module's notes): 404 naming the alternative."""
    raise ApiError(404, EMBEDDINGS_404, type="not_found_error", code="embeddings_not_served")


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    """Token ids of a text prompt, or of chat messages with the chat template applied."""
    engine = _engine(request)
    req = await read_json(request, TokenizeRequest)
    engine.check_model(req.model)
    engine.require_ready()
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "send either prompt or messages", param="prompt")
    if req.messages is not None:
        prompt: Any = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await run_in_threadpool(engine.encode, prompt, chat=True)
    else:
        ids = await run_in_threadpool(engine.encode, req.prompt, chat=False, special=req.add_special_tokens)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": engine.lm.context})


@router.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    """The text of token ids."""
    engine = _engine(request)
    req = await read_json(request, DetokenizeRequest)
    engine.check_model(req.model)
    text = await run_in_threadpool(engine.decode, req.tokens)
    return JSONResponse({"prompt": text})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format: requests, tokens, speed, latency, expert cache and queue."""
    engine = _engine(request)
    text = await run_in_threadpool(lambda: engine.metrics.render(engine.gauges()))
    return Response(text, media_type=CONTENT_TYPE)
