"""The generation engine: loads the model in the background and runs one generation at a time.

One worker thread owns the model (torch is not re-entrant here): requests wait in a FIFO queue of
at most ``max_queue`` entries and are taken one by one. The worker hands each token to the
request's asyncio queue with ``call_soon_threadsafe`` and checks the request's cancel flag between
tokens, so a client that goes away stops its generation after at most one more token.
Prompts are tokenized on the request's side with a private copy of the tokenizer (the worker's
copy is busy detokenizing), so errors such as a prompt longer than the context are answered
before the request queues.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from moe_local.config import LoadOptions, SamplingParams
from moe_local.errors import MoeLocalError, first_line
from moe_local.server.jobs import Job, State, Step
from moe_local.server.metrics import Gauges, Metrics
from moe_local.server.protocol import ApiError
from moe_local.server.tokens import TokenPieces

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
    """

    def __init__(
        self,
        model: str | Path,
        options: LoadOptions | None = None,
        *,
        max_queue: int = 16,
        model_name: str | None = None,
        prepare: Callable[[], tuple[str | Path, LoadOptions]] | None = None,
    ) -> None:
        if max_queue < 1:
            raise MoeLocalError("max_queue must be at least 1")
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
        self._thread: threading.Thread | None = None
        self.on_load_error: Callable[[], None] | None = None  # e.g. tell the HTTP server to stop
        self._prepare = prepare

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start loading the model and then serving the queue, in a daemon thread."""
        self._thread = threading.Thread(target=self._main, name="moe-local-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Cancel the running generation and every queued one; stop the worker."""
        with self._lock:
            if self._current is not None:
                self._current.cancelled.set()
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
        self, prompt: str | Sequence[int] | list[dict], *, chat: bool, special: bool = True
    ) -> list[int]:
        """Tokenize a prompt on the request side (call it from a worker thread of the event loop).

        Chat messages are encoded with their content as text (see ``moe_local.prompt``); plain text
        (``/v1/completions``, ``/tokenize`` with a prompt) is the client's raw prompt, special-token
        spellings included, as llama-server and vLLM take raw prompts.

        Args:
            prompt: text, token ids, or chat messages.
            chat: apply the chat template (messages always get it).
            special: add the tokenizer's special tokens to plain text.

        Returns:
            The token ids.

        Raises:
            ApiError: 400 for token ids outside the vocabulary, text that is not valid Unicode or
                messages the chat template refuses; 500 when the chat template itself fails.
        """
        from moe_local.prompt import ChatTemplateError, check_unicode, encode_prompt

        self.require_ready()
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return self.check_ids(prompt)
        with self._tok_lock:
            try:
                if isinstance(prompt, str) and not chat:
                    check_unicode(prompt)
                    return list(self._tokenizer.encode(prompt, add_special_tokens=special))
                return encode_prompt(replace(self.lm, tokenizer=self._tokenizer), prompt, chat)
            except ChatTemplateError as exc:
                if exc.refused:  # the template's own raise_exception(): these messages are at fault
                    raise ApiError(400, str(exc), code="chat_template_refused") from exc
                log.error("%s", exc)  # the model's template is broken (or hostile): the operator must know
                raise ApiError(500, str(exc), type="server_error", code="chat_template_error") from exc
            except MoeLocalError as exc:
                raise ApiError(400, str(exc)) from exc

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

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, logprobs: bool = False) -> Job:
        """Queue a generation.

        Args:
            prompt_ids: the prompt's token ids (already checked against the context).
            params: sampling and stopping options.
            logprobs: report each token's text and log-probabilities.

        Returns:
            The job; iterate ``job.steps()`` for its tokens.

        Raises:
            ApiError: 429 when ``max_queue`` requests are already waiting; 503 while loading.
        """
        self.require_ready()
        job = Job(prompt_ids, params, logprobs, asyncio.get_running_loop(), on_cancel=self._unqueue)
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
            queue_depth=len(self._waiting), running=self._running, model_ready=self.state is State.READY
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
        from moe_local.generation import stream_generate

        t0 = time.perf_counter()
        queue_s = t0 - job.queued_at
        outcome, first, tokens = "error", None, 0
        gen = stream_generate(self.lm, job.prompt_ids, job.params, chat=False)
        try:
            for resp in gen:
                if first is None and resp.token is not None:
                    first = time.perf_counter()
                if job.cancelled.is_set():
                    outcome = "cancelled"
                    break
                tokens = resp.generation_tokens
                job.put(self._step(resp, job.logprobs))
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
            step.top = [(*self._pieces.piece(t), lp) for t, lp in resp.top_logprobs]
        return step
