"""The generation engine: loads the model in the background and runs its generations.

One worker thread owns the model (torch is not re-entrant here): requests wait in a FIFO queue of
at most ``max_queue`` entries. With ``parallel`` 1 they are taken one by one; with more, up to
``parallel`` generations decode together in one batch (continuous batching, see
``moe_local.server.batch``), new ones joining and finished ones leaving at token boundaries, for
the families ``moe_local.batching.batch_support`` accepts (others are served one at a time, said
once in the log). The worker hands each token to the
request's asyncio queue with ``call_soon_threadsafe`` and checks the request's cancel flag between
tokens, so a client that goes away stops its generation after at most one more token.
Prompts are tokenized on the request's side with a private copy of the tokenizer (the worker's
copy is busy detokenizing), so errors such as a prompt longer than the context are answered
before the request queues. Grammars (``response_format``, forced tool calls) are compiled there
too, so a schema the engine cannot take is a 400 before the request queues; the worker gives
each generation a fresh matcher of it. A request's ``n`` choices run one after another as one job.
"""

from __future__ import annotations

import asyncio
import codecs
import copy
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from moe_local.config import LoadOptions, SamplingParams
from moe_local.errors import MoeLocalError, first_line
from moe_local.grammar import GrammarCompiler, GrammarError, GrammarUnavailable, lark_literal
from moe_local.sampling import GuidedParams
from moe_local.server.jobs import Job, State, Step
from moe_local.server.metrics import Gauges, Metrics
from moe_local.server.protocol import ApiError
from moe_local.server.tokens import TokenPieces
from moe_local.server.tool_calls import HermesSyntax, ToolSyntax, syntax_for
from moe_local.server.tools import WithTools

log = logging.getLogger("moe_local.server")


class Engine:
    """Owns the model: background loading, the request queue and the worker thread.

    Args:
        model: checkpoint folder or hub id, as ``moe_local.load`` takes it.
        options: how to load it.
        max_queue: most requests waiting (not counting the running one); more answer 429.
        model_name: the name clients use (default: the folder's name, or the hub id).
        prepare: run first in the loading thread, returning the folder to load and its options
            (the CLI's planner and ``--offload-dir`` staging), so the port answers meanwhile.
        parallel: most generations decoded together (1: one at a time, as before batching).
    """

    def __init__(
        self,
        model: str | Path,
        options: LoadOptions | None = None,
        *,
        max_queue: int = 16,
        model_name: str | None = None,
        prepare: Callable[[], tuple[str | Path, LoadOptions]] | None = None,
        parallel: int = 1,
    ) -> None:
        if max_queue < 1:
            raise MoeLocalError("max_queue must be at least 1")
        if parallel < 1:
            raise MoeLocalError(f"parallel must be at least 1 (got {parallel})")
        self.parallel = parallel
        self.batch_size = 0  # generations in the latest decode step
        self.model = model
        self.options = options or LoadOptions()
        self.max_queue = max_queue
        path = Path(str(model))
        self.name = model_name or (path.name if path.exists() else str(model))
        self.created = int(time.time())
        self.state = State.LOADING
        self.error = ""
        self.lm: Any = None
        self.metrics = Metrics()
        self._tokenizer: Any = None  # the request side's copy
        self._pieces: TokenPieces | None = None  # the worker's token texts for logprobs
        self._tok_lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting: set[Job] = set()  # queued, not started, not cancelled
        self._running = 0
        self._current: Job | None = None
        self._jobs: set[Job] = set()  # running in the batch (parallel > 1)
        self._thread: threading.Thread | None = None
        self.on_load_error: Callable[[], None] | None = None  # e.g. tell the HTTP server to stop
        self._prepare = prepare
        self._grammar: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start loading the model and then serving the queue, in a daemon thread."""
        self._thread = threading.Thread(target=self._main, name="moe-local-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Cancel the running generation and every queued one; stop the worker."""
        with self._lock:
            for job in [self._current, *self._jobs]:
                if job is not None:
                    job.cancelled.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                job.put(ApiError(503, "the server is shutting down", type="server_error"))
                job.put(None)
        self._queue.put(None)

    def _main(self) -> None:
        try:
            self._load()
        except Exception as exc:  # any load failure is reported by /health, not raised in a thread
            self.error = first_line(exc)
            self.state = State.FAILED
            log.error("cannot load %s: %s", self.model, self.error)
            if not isinstance(exc, MoeLocalError):
                log.debug("load failure", exc_info=True)
            if self.on_load_error is not None:
                self.on_load_error()
            return
        self.state = State.READY
        log.info("model %s ready (context %d tokens)", self.name, self.lm.context)
        self._serve()

    def _load(self) -> None:
        import torch

        from moe_local import env
        from moe_local.loading.loader import load

        threads = env.threads()
        if threads:
            torch.set_num_threads(threads)
        target = self.model
        if self._prepare is not None:  # planning and staging count as loading: /health says 503
            target, self.options = self._prepare()
        lm = load(target, self.options)
        if lm.tokenizer is None:
            raise MoeLocalError(f"{self.model} has no tokenizer; the server needs one")
        self._tokenizer = copy.deepcopy(lm.tokenizer)
        self._pieces = TokenPieces(lm.tokenizer)
        self.lm = lm

    # -- request side -------------------------------------------------------------------------

    def require_ready(self) -> None:
        """Raise 503 unless the model is loaded."""
        if self.state is State.LOADING:
            raise ApiError(
                503, "the model is still loading; retry shortly", type="server_error", code="loading"
            )
        if self.state is State.FAILED:
            raise ApiError(503, f"the model failed to load: {self.error}", type="server_error")

    def check_model(self, name: str | None) -> None:
        """Raise 404 when a request names a model this server does not serve."""
        if name is not None and name != self.name:
            raise ApiError(
                404,
                f"model {name!r} is not served here; this server serves {self.name!r}",
                param="model",
                code="model_not_found",
            )

    def encode(
        self,
        prompt: str | Sequence[int] | list[dict],
        *,
        chat: bool,
        special: bool = True,
        tools: list[dict] | None = None,
    ) -> list[int]:
        """Tokenize a prompt on the request side (call it from a worker thread of the event loop).

        Chat messages are encoded with their content as text (see ``moe_local.prompt``); plain text
        (``/v1/completions``, ``/tokenize`` with a prompt) is the client's raw prompt, special-token
        spellings included, as llama-server and vLLM take raw prompts.

        Args:
            prompt: text, token ids, or chat messages.
            chat: apply the chat template (messages always get it).
            special: add the tokenizer's special tokens to plain text.
            tools: function definitions handed to the chat template (``tools=``).

        Returns:
            The token ids.

        Raises:
            ApiError: 400 for token ids outside the vocabulary, text that is not valid Unicode,
                messages the chat template refuses or a model without a chat template (Switch
                Transformers); 500 when the chat template itself fails.
        """
        from moe_local.prompt import ChatTemplateError, check_unicode, encode_prompt

        self.require_ready()
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return self.check_ids(prompt)
        if (chat or isinstance(prompt, list)) and not self.chat_template():
            raise ApiError(
                400,
                f"{self.name} has no chat template, so it cannot take chat messages; "
                "send a plain-text prompt to /v1/completions",
                code="no_chat_template",
            )
        with self._tok_lock:
            try:
                if isinstance(prompt, str) and not chat:
                    check_unicode(prompt)
                    return list(self._tokenizer.encode(prompt, add_special_tokens=special))
                tok = self._tokenizer if not tools else WithTools(self._tokenizer, tools)
                return encode_prompt(replace(self.lm, tokenizer=tok), prompt, chat)
            except ChatTemplateError as exc:
                if exc.refused:  # the template's own raise_exception(): these messages are at fault
                    raise ApiError(400, str(exc), code="chat_template_refused") from exc
                log.error("%s", exc)  # the model's template is broken (or hostile): the operator must know
                raise ApiError(500, str(exc), type="server_error", code="chat_template_error") from exc
            except MoeLocalError as exc:
                raise ApiError(400, str(exc)) from exc

    def tool_syntax(self) -> ToolSyntax:
        """The model's tool-call syntax, told by its chat template or its family.

        Hermes' when the template does not read ``tools``: the tools are then described in a
        system turn in Hermes' words (``moe_local.server.tools``), so the reply is read that way.
        """
        if "tools" not in self.chat_template():
            return HermesSyntax()
        return syntax_for(self.chat_template(), getattr(self.lm.config, "model_type", None))

    def chat_template(self) -> str:
        """The chat template's text ("" without one)."""
        template = getattr(self._tokenizer, "chat_template", None)
        return template if isinstance(template, str) else str(template or "")

    def grammar(self, *, schema: dict | None = None, lark: str | None = None, what: str) -> str:
        """Compile a JSON schema or a Lark grammar for this model's tokenizer (request side).

        Args:
            schema: a JSON schema (``{"type": "object"}`` for any object).
            lark: Lark text instead.
            what: the request field that asked, for messages.

        Raises:
            ApiError: 400 when the grammar engine is missing or cannot take the grammar.
        """
        try:
            with self._grammar_lock:
                if self._grammar is None:
                    with self._tok_lock:
                        vocab = max(len(self._tokenizer), self._vocab_size())
                        self._grammar = GrammarCompiler(self._tokenizer, vocab, self.lm.eos_token_ids)
        except (GrammarUnavailable, GrammarError) as exc:  # no engine, or not for this tokenizer
            raise ApiError(400, f"{what}: {exc}", param=what, code="grammar_unavailable") from exc
        try:
            return self._grammar.lark(lark) if lark is not None else self._grammar.json_schema(schema)
        except GrammarError as exc:
            raise ApiError(400, f"{what}: {exc}", param=what, code="invalid_schema") from exc

    def literal(self, marker: str) -> str:
        """How a grammar spells ``marker``: its token by id when it is one added token, else its text."""
        added = getattr(self._tokenizer, "added_tokens_encoder", None) or {}
        token = added.get(marker)
        return f"<[{token}]>" if token is not None else lark_literal(marker)

    def raw_skip(self, syntax: ToolSyntax) -> frozenset[int]:
        """Added tokens (turn markers ...) that are not ``syntax``'s call markers: left out of raw text."""
        added = getattr(self._tokenizer, "added_tokens_encoder", None) or {}
        return frozenset(i for name, i in added.items() if name not in syntax.markers)

    def _vocab_size(self) -> int:
        return int(self.lm.model.get_input_embeddings().weight.shape[0])

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        """Return ``ids`` as a list, or raise 400 if one is outside the vocabulary."""
        vocab = int(self.lm.model.get_input_embeddings().weight.shape[0])
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Detokenize on the request side."""
        self.require_ready()
        ids = self.check_ids(ids)
        with self._tok_lock:
            return self._tokenizer.decode(ids)

    def check_length(self, n_prompt: int, param: str) -> None:
        """Raise 400 when a prompt leaves no room in the context, saying the numbers."""
        if n_prompt == 0:
            raise ApiError(400, "the prompt is empty", param=param)
        if n_prompt >= self.lm.context:
            raise ApiError(
                400,
                f"this model's context holds {self.lm.context} tokens, but the prompt is {n_prompt} tokens; "
                "shorten the prompt",
                param=param,
                code="context_length_exceeded",
            )

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        logprobs: bool = False,
        n: int = 1,
        grammar: str | None = None,
        raw_skip: frozenset[int] | None = None,
    ) -> Job:
        """Queue a request of ``n`` generations.

        Args:
            prompt_ids: the prompt's token ids (already checked against the context).
            params: sampling and stopping options.
            logprobs: report each token's text and log-probabilities.
            n: choices to generate (seeds ``seed``, ``seed + 1`` ...).
            grammar: a grammar from ``grammar()`` every choice must follow.
            raw_skip: fill each step's ``raw`` text, leaving these tokens out (None: no raw text).

        Returns:
            The job; iterate ``job.steps()`` for its tokens.

        Raises:
            ApiError: 429 when ``max_queue`` requests are already waiting; 503 while loading.
        """
        self.require_ready()
        job = Job(
            prompt_ids,
            params,
            logprobs,
            asyncio.get_running_loop(),
            n=n,
            grammar=grammar,
            raw=raw_skip is not None,
            raw_skip=raw_skip or frozenset(),
            on_cancel=self._unqueue,
        )
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise ApiError(
                    429,
                    f"{len(self._waiting)} requests are already waiting (max_queue); retry later",
                    type="rate_limit_error",
                    code="queue_full",
                )
            self._waiting.add(job)
        self._queue.put(job)
        return job

    def _unqueue(self, job: Job) -> None:
        """A job cancelled before it started no longer counts as waiting."""
        with self._lock:
            self._waiting.discard(job)

    def gauges(self) -> Gauges:
        """Live values for ``/metrics``: queue depth, model state and the expert store's counters."""
        g = Gauges(
            queue_depth=len(self._waiting),
            running=max(self._running, len(self._jobs)),
            model_ready=self.state is State.READY,
            batch_size=max(self._running, self.batch_size),
            parallel=self.parallel,
        )
        if self.lm is not None:
            t = self._store_totals()
            g.expert_hits, g.expert_misses, g.expert_evictions = t.hits, t.misses, t.evictions
            g.bytes_from_ram, g.bytes_from_disk = t.bytes_from_ram, t.bytes_from_disk
            g.io_wait_s, g.prefetched = t.io_wait_s, t.prefetched
        return g

    def _store_totals(self) -> Any:
        """The expert store's counters; retried because the worker may add a layer meanwhile."""
        for _ in range(5):
            try:
                return self.lm.store.stats().total
            except RuntimeError:  # "dictionary changed size during iteration"
                time.sleep(0.001)
        return self.lm.store.stats().total

    # -- worker side --------------------------------------------------------------------------

    def _serve(self) -> None:
        if self.parallel > 1:
            from moe_local.batching import batch_support
            from moe_local.server.batch import Scheduler

            why = batch_support(self.lm)
            if why is None:
                log.info("decoding up to %d generations together", self.parallel)
                Scheduler(self, self.parallel).run()
                return
            log.warning("serving one generation at a time: %s", why)
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                started = job in self._waiting
                self._waiting.discard(job)
                self._current, self._running = job, 1
            try:
                if started and not job.cancelled.is_set():
                    self._run(job)
            except GrammarError as exc:  # the engine failed mid-way: not the client's fault
                log.error("%s", exc)
                job.put(ApiError(500, str(exc), type="server_error"))
            except MoeLocalError as exc:
                job.put(ApiError(400, str(exc)))
            except Exception:  # a bug must not kill the worker: log it, tell the client, go on
                log.exception("generation failed")
                job.put(ApiError(500, "internal error during generation", type="server_error"))
            finally:
                with self._lock:
                    self._current, self._running = None, 0
                job.put(None)

    def _run(self, job: Job) -> None:
        for index in range(job.n):
            if job.cancelled.is_set():
                return
            self._run_one(job, index)

    def _params_of(self, job: Job, index: int) -> SamplingParams:
        """The choice's own parameters: its seed offset, and a fresh grammar matcher."""
        params, seed = job.params, job.params.seed
        if seed is not None and index:
            seed = seed + index if seed + index < 2**63 else seed - index
            params = replace(params, seed=seed)
        if job.grammar is None or self._grammar is None:
            return params
        mask = self._grammar.processor(job.grammar, len(job.prompt_ids))
        return GuidedParams(**{f.name: getattr(params, f.name) for f in fields(params)}, processors=(mask,))

    def _run_one(self, job: Job, index: int) -> None:
        from moe_local.generation import stream_generate

        t0 = time.perf_counter()
        queue_s = t0 - job.queued_at
        outcome, first, tokens = "error", None, 0
        gen = stream_generate(self.lm, job.prompt_ids, self._params_of(job, index), chat=False)
        raw = codecs.getincrementaldecoder("utf-8")("replace") if job.raw else None
        try:
            for resp in gen:
                if first is None and resp.token is not None:
                    first = time.perf_counter()
                if job.cancelled.is_set():
                    outcome = "cancelled"
                    break
                tokens = resp.generation_tokens
                step = self._step(resp, job.logprobs)
                step.index = index
                if raw is not None:
                    step.raw = self._raw(raw, resp.token, job.raw_skip)
                job.put(step)
                if resp.finish_reason is not None:
                    outcome = resp.finish_reason
        finally:
            gen.close()
            end = time.perf_counter()
            self.metrics.count_generation(
                outcome,
                prompt_tokens=len(job.prompt_ids),
                tokens=tokens,
                ttft_s=None if first is None else first - t0,
                decode_s=0.0 if first is None else end - first,
                queue_s=queue_s,
                total_s=end - job.queued_at,
            )

    def _raw(self, decoder: codecs.IncrementalDecoder, token: int | None, skip: frozenset[int]) -> str:
        """The token's exact text (markers kept), decoded incrementally; the decoder's rest at the end."""
        if token is None:
            return decoder.decode(b"", final=True)
        if token in skip or self._pieces is None:
            return ""
        return decoder.decode(self._pieces.piece(token)[1])

    def _step(self, resp: Any, logprobs: bool) -> Step:
        step = Step(
            text=resp.text,
            prompt_tokens=resp.prompt_tokens,
            completion_tokens=resp.generation_tokens,
            finish_reason=resp.finish_reason,
        )
        if logprobs and resp.token is not None and self._pieces is not None:
            step.token_text, step.token_bytes = self._pieces.piece(resp.token)
            step.logprob = resp.logprob
            # a token a grammar forbids has log-probability -inf, which JSON cannot carry
            step.top = [(*self._pieces.piece(t), lp) for t, lp in resp.top_logprobs if lp > float("-inf")]
        return step
