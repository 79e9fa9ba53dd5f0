"""Continuous batching for the server's worker: up to ``parallel`` generations decode together.

The worker takes jobs from the engine's queue whenever a place is free (at a step boundary),
prefills each new generation alone, and then decodes every running generation in one forward pass
per token (``moe_local.batching.new_batch``: the lean step where it computes the model, else a padded
batch through transformers), so an expert loaded for one step serves every
sequence routed to it. Each generation keeps its own KV cache rows, sampler (its own seeded
generator), penalties, grammar matcher, stop strings, logprobs and budget: its tokens go through
``stream_from_steps`` exactly as a lone generation's do. A finished or cancelled generation leaves
at once; a job's ``n`` choices still run one after another, each taking the job's place in turn.
"""

from __future__ import annotations

import codecs
import logging
import queue
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moe_local.batching import LogitsBox, batched_steps, new_batch, prefill
from moe_local.errors import MoeLocalError
from moe_local.grammar import GrammarError
from moe_local.server.jobs import Job
from moe_local.server.protocol import ApiError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from moe_local.generation import GenerationResponse
    from moe_local.server.engine import Engine

log = logging.getLogger("moe_local.server")


@dataclass(eq=False)
class Slot:
    """One generation (choice ``index`` of ``job``) while it runs."""

    job: Job
    index: int
    budget: int
    box: LogitsBox = field(default_factory=LogitsBox)
    stream: Iterator[GenerationResponse] | None = None
    raw: codecs.IncrementalDecoder | None = None
    cache: Any = None  # its prefilled cache, until it joins the batch
    started: float = field(default_factory=time.perf_counter)
    first: float | None = None
    tokens: int = 0
    last: int = 0  # the newest token, fed to the next step
    outcome: str = "error"


class Scheduler:
    """Runs the engine's queue with up to ``parallel`` generations decoding together.

    Args:
        engine: the engine whose queue, model and metrics it serves.
        parallel: most generations in one decode batch (at least 2).
    """

    def __init__(self, engine: Engine, parallel: int) -> None:
        self.engine = engine
        self.lm = engine.lm
        self.parallel = parallel
        self.batch = new_batch(engine.lm)
        self.active: list[Slot] = []

    def run(self) -> None:
        """Serve until the engine's queue hands over its end marker (None)."""
        while self._admit():
            if self.active:
                self._decode()

    # -- admission ----------------------------------------------------------------------------

    def _admit(self) -> bool:
        """Start queued jobs while places are free; wait only when nothing runs. False: shut down."""
        engine = self.engine
        while len(self.active) < self.parallel:
            try:
                job = engine._queue.get(block=not self.active)
            except queue.Empty:
                return True
            if job is None:
                self._shutdown()
                return False
            with engine._lock:
                started = job in engine._waiting
                engine._waiting.discard(job)
                if started and not job.cancelled.is_set():
                    engine._jobs.add(job)
            if not started or job.cancelled.is_set():
                job.put(None)
                continue
            self._start(job, 0)
        return True

    def _start(self, job: Job, index: int) -> None:
        """Prefill choice ``index`` of ``job``, emit its first token, and let it join the batch."""
        from moe_local.generation import stream_from_steps

        lm = self.lm
        slot = Slot(job, index, min(job.params.max_tokens, lm.context - len(job.prompt_ids)))
        slot.raw = codecs.getincrementaldecoder("utf-8")("replace") if job.raw else None

        def first():
            slot.cache, logits = prefill(lm, job.prompt_ids)
            return logits

        try:
            params = self.engine._params_of(job, index)
            slot.stream = stream_from_steps(
                lm,
                job.prompt_ids,
                params,
                lambda sampler, procs: batched_steps(first, slot.box, job.prompt_ids, sampler, procs),
            )
            going = self._advance(slot)
        except Exception as exc:  # this job's failure, not the batch's
            self._fail(slot, exc)
            return
        if going:
            self.batch.join(slot, slot.cache, len(job.prompt_ids))
            slot.cache = None
            self.active.append(slot)
            self.engine.batch_size = len(self.active)
        else:
            self._end(slot)

    # -- decoding -----------------------------------------------------------------------------

    def _decode(self) -> None:
        """One token for every running generation, in one forward pass."""
        try:
            logits = self.batch.step({slot: slot.last for slot in self.active})
        except Exception as exc:  # the model failed: every generation in the batch ends with it
            slots, self.active, self.batch = self.active, [], new_batch(self.lm)
            for slot in slots:
                self._fail(slot, exc)
            return
        self.engine.metrics.count_step(len(logits))
        for slot in list(self.active):
            slot.box.put(logits[slot])
            try:
                going = self._advance(slot)
            except Exception as exc:
                self._leave(slot)
                self._fail(slot, exc)
                continue
            if not going:
                self._leave(slot)
                self._end(slot)

    def _advance(self, slot: Slot) -> bool:
        """Hand the slot's next response(s) to its client; whether it needs another step."""
        job = slot.job
        assert slot.stream is not None  # set by _start before the first call
        while True:
            resp = next(slot.stream)
            if slot.first is None and resp.token is not None:
                slot.first = time.perf_counter()
            if job.cancelled.is_set():
                slot.outcome = "cancelled"
                return False
            slot.tokens = resp.generation_tokens
            step = self.engine._step(resp, job.logprobs)
            step.index = slot.index
            if slot.raw is not None:
                step.raw = self.engine._raw(slot.raw, resp.token, job.raw_skip)
            job.put(step)
            if resp.finish_reason is not None:
                slot.outcome = resp.finish_reason
                return False
            slot.last = int(resp.token)
            if resp.generation_tokens < slot.budget:
                return True
            # the budget is spent: the next response is the summary, and needs no logits

    def _leave(self, slot: Slot) -> None:
        self.active.remove(slot)
        self.batch.leave(slot)
        self.engine.batch_size = len(self.active)

    # -- endings ------------------------------------------------------------------------------

    def _end(self, slot: Slot) -> None:
        """Count the finished generation; start the job's next choice, or close the job."""
        self._close(slot)
        job = slot.job
        if (
            slot.outcome not in ("cancelled", "error")
            and slot.index + 1 < job.n
            and not job.cancelled.is_set()
        ):
            self._start(job, slot.index + 1)
            return
        self._finish_job(job)

    def _fail(self, slot: Slot, exc: Exception) -> None:
        """Tell the client why its generation failed (as the one-at-a-time worker does); close it."""
        if isinstance(exc, GrammarError):  # the engine failed mid-way: not the client's fault
            log.error("%s", exc)
            error = ApiError(500, str(exc), type="server_error")
        elif isinstance(exc, MoeLocalError):
            error = ApiError(400, str(exc))
        else:  # a bug must not kill the worker: log it, tell the client, go on
            log.error("generation failed", exc_info=exc)
            error = ApiError(500, "internal error during generation", type="server_error")
        slot.outcome = "error"
        self._close(slot)
        slot.job.put(error)
        self._finish_job(slot.job)

    def _close(self, slot: Slot) -> None:
        if slot.stream is not None:
            slot.stream.close()
        end = time.perf_counter()
        first = slot.first
        self.engine.metrics.count_generation(
            slot.outcome,
            prompt_tokens=len(slot.job.prompt_ids),
            tokens=slot.tokens,
            ttft_s=None if first is None else first - slot.started,
            decode_s=0.0 if first is None else end - first,
            queue_s=slot.started - slot.job.queued_at,
            total_s=end - slot.job.queued_at,
        )

    def _finish_job(self, job: Job) -> None:
        with self.engine._lock:
            self.engine._jobs.discard(job)
        job.put(None)

    def _shutdown(self) -> None:
        """The engine stops: end every running generation (the engine already cancelled them)."""
        for slot in list(self.active):
            slot.outcome = "cancelled"
            self._leave(slot)
            self._close(slot)
            self._finish_job(slot.job)
