"""The OpenAI wire protocol as pydantic models: requests (validated strictly) and responses.

Requests reject wrong types instead of coercing them (``"max_tokens": "8"`` is an error, as it is
for OpenAI) and ignore fields this server does not know; fields that would change the meaning of
a request and are not supported (``logit_bias``, ``echo`` ...) are refused clearly by
``check_supported``; so is a constraint (``response_format``, a forced ``tool_choice``) when the
grammar engine is not installed. Responses follow the shapes the official ``openai`` client parses.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 16  # stop strings per request (OpenAI allows 4; more only costs a scan per token)
MAX_STOP_CHARS = 512  # the detokenizer scans for each stop string after every token
MAX_LOGPROBS = 20
MAX_N = 8  # choices per request: each is a whole generation, queued like a request of its own
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class ApiError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with an HTTP status.

    Args:
        status: the HTTP status code.
        message: one line saying what is wrong and, where useful, what to do.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error`` ...).
        param: the request field at fault, if any.
        code: a short machine-readable code, if any.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """Return the OpenAI-shaped error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    """``stream_options``: whether the last chunk before ``[DONE]`` carries the usage."""

    include_usage: bool | None = None


class ContentPart(_Request):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is supported."""

    type: str
    text: str | None = None


class ChatMessage(_Request):
    """A chat turn."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """Return the content as plain text.

        Returns:
            The content, text parts joined; "" for no content.

        Raises:
            ApiError: a content part is not text.
        """
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"content parts of type {part.type!r} are not supported; send text")
        return "".join(part.text or "" for part in self.content)


class _Sampling(_Request):
    """Fields shared by both generation endpoints."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions (as vLLM names them), for clients that pass them in extra_body
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    ignore_eos: bool | None = None

    def stop_strings(self) -> tuple[str, ...]:
        """Return ``stop`` as a tuple of strings."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise ApiError(400, f"at most {MAX_STOP} stop strings are allowed", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise ApiError(400, f"stop strings are limited to {MAX_STOP_CHARS} characters", param="stop")
        return tuple(stop)

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def _check_common(self) -> None:
        if self.n is not None and not 1 <= self.n <= MAX_N:
            raise ApiError(400, f"n must be between 1 and {MAX_N}", param="n")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        """Refuse options this server cannot honour.

        Raises:
            ApiError: 400 naming the option.
        """
        self._check_common()
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        schema = self.json_schema()
        if schema is not None and self.tool_choice not in (None, "none", "auto"):
            raise ApiError(
                400, "send either response_format or a forced tool_choice", param="response_format"
            )
        if (schema is not None or self.tool_choice not in (None, "none", "auto")) and self.ignore_eos:
            raise ApiError(400, "ignore_eos cannot be combined with a constrained reply", param="ignore_eos")

    def json_schema(self) -> dict[str, Any] | None:
        """The schema ``response_format`` asks for: ``{}`` for any JSON object, None for free text.

        Raises:
            ApiError: 400 for an unknown type or a ``json_schema`` without a schema object.
        """
        fmt = self.response_format or {}
        kind = fmt.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "object"}
        if kind != "json_schema":
            raise ApiError(
                400,
                "response_format type must be 'text', 'json_object' or 'json_schema'",
                param="response_format",
            )
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(
                400,
                "response_format.json_schema.schema must be a JSON schema object",
                param="response_format",
            )
        return schema

    def token_limit(self) -> int | None:
        """The most tokens to generate (``max_completion_tokens`` wins over ``max_tokens``)."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        """Refuse options this server cannot honour.

        Raises:
            ApiError: 400 naming the option.
        """
        self._check_common()
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of must be 1", param="best_of")
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")

    def single_prompt(self) -> str | list[int]:
        """Return the one prompt: text or token ids.

        Raises:
            ApiError: several prompts (batches are not supported) or none.
        """
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if prompt and all(isinstance(p, int) for p in prompt):
            return [int(p) for p in prompt]
        if len(prompt) != 1:
            raise ApiError(400, "send exactly one prompt per request", param="prompt")
        return prompt[0] if isinstance(prompt[0], str) else list(prompt[0])


class TokenizeRequest(_Request):
    """``POST /tokenize``: a text prompt, or chat messages (the chat template is applied)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Request):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    """One alternative token and its log-probability (chat logprobs)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """A generated token, its log-probability and the most likely alternatives (chat logprobs)."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """``choices[].logprobs`` of a chat completion."""

    content: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """``choices[].logprobs`` of a text completion (the legacy shape)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class FunctionCall(BaseModel):
    """A call's function: its name and arguments (JSON text); in a delta, either may be absent."""

    name: str | None = None
    arguments: str | None = None


class ToolCall(BaseModel):
    """A tool call of the reply (``index`` only in streamed deltas)."""

    index: int | None = None
    id: str | None = None
    type: Literal["function"] | None = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    """The generated message (or, in a chunk, its delta)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatChunkChoice(BaseModel):
    """One choice of a streamed chat chunk."""

    index: int = 0
    delta: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class CompletionChoice(BaseModel):
    """One choice of a text completion (or of a streamed chunk)."""

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    """A whole chat completion (``object: chat.completion``) or a chunk of one."""

    id: str
    object: Literal["chat.completion", "chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChoice] | list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Completion(BaseModel):
    """A whole text completion or a chunk of one (``object: text_completion``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moe-local"


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
