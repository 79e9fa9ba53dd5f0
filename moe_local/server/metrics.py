"""Server metrics in the Prometheus text format (``GET /metrics``), without a client library.

``Metrics`` holds counters the worker and the HTTP layer update; ``render`` adds the live gauges
(queue depth, model state) and the expert store's cumulative counters at scrape time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PATHS = frozenset(
    {
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/tokenize",
        "/detokenize",
    }
)


@dataclass
class Histogram:
    """A cumulative histogram with fixed upper bounds (seconds)."""

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.n += 1
        self.total += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        """Return the ``_bucket``, ``_sum`` and ``_count`` sample lines."""
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.bounds, self.counts, strict=True)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out.append(f"{name}_sum {self.total:.6f}")
        out.append(f"{name}_count {self.n}")
        return out


@dataclass
class Gauges:
    """Values read at scrape time from the engine and the expert store."""

    queue_depth: int = 0
    running: int = 0
    model_ready: bool = False
    expert_hits: int = 0
    expert_misses: int = 0
    expert_evictions: int = 0
    bytes_from_ram: int = 0
    bytes_from_disk: int = 0
    io_wait_s: float = 0.0
    prefetched: int = 0
    batch_size: int = 0
    parallel: int = 1


class Metrics:
    """Thread-safe counters of requests, tokens, speed and latency."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.generations: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.decode_seconds = 0.0
        self.last_tps = 0.0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.queue_wait = Histogram(LATENCY_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.decode_steps: dict[int, int] = {}  # batched decode steps by batch size

    def count_step(self, batch: int) -> None:
        """Count one batched decode step of ``batch`` generations."""
        with self._lock:
            self.decode_steps[batch] = self.decode_steps.get(batch, 0) + 1

    def count_request(self, path: str, status: int) -> None:
        """Count one HTTP response by endpoint and status."""
        key = (path if path in PATHS else "other", status)
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def count_generation(
        self,
        outcome: str,
        *,
        prompt_tokens: int,
        tokens: int,
        ttft_s: float | None,
        decode_s: float,
        queue_s: float,
        total_s: float,
    ) -> None:
        """Record one finished (or cancelled, or failed) generation.

        Args:
            outcome: the finish reason ("stop", "length"), "cancelled" or "error".
            prompt_tokens: tokens in the prompt.
            tokens: tokens generated.
            ttft_s: time from the start of the generation to its first token (None: none came).
            decode_s: seconds spent after the first token.
            queue_s: seconds the request waited in the queue.
            total_s: seconds from queueing to the end.
        """
        with self._lock:
            self.generations[outcome] = self.generations.get(outcome, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += tokens
            self.decode_seconds += decode_s
            if tokens > 1 and decode_s > 0:
                self.last_tps = (tokens - 1) / decode_s
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            self.queue_wait.observe(queue_s)
            self.latency.observe(total_s)

    def render(self, gauges: Gauges) -> str:
        """Return every metric in the Prometheus text exposition format."""
        out: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[str]) -> None:
            out.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", *samples])

        with self._lock:
            metric(
                "moe_local_requests_total",
                "counter",
                "HTTP responses by endpoint and status.",
                [
                    f'moe_local_requests_total{{endpoint="{p}",status="{s}"}} {n}'
                    for (p, s), n in self.requests.items()
                ],
            )
            metric(
                "moe_local_generations_total",
                "counter",
                "Generations by outcome (stop, length, cancelled, error).",
                [f'moe_local_generations_total{{outcome="{k}"}} {n}' for k, n in self.generations.items()],
            )
            metric(
                "moe_local_prompt_tokens_total",
                "counter",
                "Prompt tokens processed.",
                [f"moe_local_prompt_tokens_total {self.prompt_tokens}"],
            )
            metric(
                "moe_local_generation_tokens_total",
                "counter",
                "Tokens generated.",
                [f"moe_local_generation_tokens_total {self.generation_tokens}"],
            )
            metric(
                "moe_local_decode_seconds_total",
                "counter",
                "Seconds spent decoding after first tokens.",
                [f"moe_local_decode_seconds_total {self.decode_seconds:.6f}"],
            )
            metric(
                "moe_local_generation_tokens_per_second",
                "gauge",
                "Decode speed of the last generation.",
                [f"moe_local_generation_tokens_per_second {self.last_tps:.3f}"],
            )
            metric(
                "moe_local_decode_steps_total",
                "counter",
                "Batched decode steps (--parallel over 1) by the number of generations in them.",
                [
                    f'moe_local_decode_steps_total{{batch="{k}"}} {n}'
                    for k, n in sorted(self.decode_steps.items())
                ],
            )
            metric(
                "moe_local_time_to_first_token_seconds",
                "histogram",
                "Time to first token.",
                self.ttft.lines("moe_local_time_to_first_token_seconds"),
            )
            metric(
                "moe_local_queue_wait_seconds",
                "histogram",
                "Time requests waited for the worker.",
                self.queue_wait.lines("moe_local_queue_wait_seconds"),
            )
            metric(
                "moe_local_request_seconds",
                "histogram",
                "Time from queueing to the last token.",
                self.latency.lines("moe_local_request_seconds"),
            )
        g = gauges
        for name, kind, help, value in (
            ("moe_local_queue_depth", "gauge", "Requests waiting for the worker.", g.queue_depth),
            ("moe_local_requests_running", "gauge", "Requests generating now.", g.running),
            ("moe_local_batch_size", "gauge", "Generations in the latest decode step.", g.batch_size),
            ("moe_local_parallel", "gauge", "Most generations decoded together (--parallel).", g.parallel),
            ("moe_local_model_ready", "gauge", "1 once the model is loaded.", int(g.model_ready)),
            ("moe_local_expert_hits_total", "counter", "Expert requests served from memory.", g.expert_hits),
            (
                "moe_local_expert_misses_total",
                "counter",
                "Expert requests that needed a read.",
                g.expert_misses,
            ),
            (
                "moe_local_expert_evictions_total",
                "counter",
                "Experts evicted from the cache.",
                g.expert_evictions,
            ),
            ("moe_local_expert_prefetched_total", "counter", "Experts read ahead of need.", g.prefetched),
            (
                "moe_local_expert_io_wait_seconds_total",
                "counter",
                "Seconds waiting for expert reads.",
                g.io_wait_s,
            ),
        ):
            metric(name, kind, help, [f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"])
        metric(
            "moe_local_expert_bytes_read_total",
            "counter",
            "Bytes of expert weights read, by tier.",
            [
                f'moe_local_expert_bytes_read_total{{tier="ram"}} {g.bytes_from_ram}',
                f'moe_local_expert_bytes_read_total{{tier="disk"}} {g.bytes_from_disk}',
            ],
        )
        return "\n".join(out) + "\n"


class RequestCounter:
    """ASGI middleware counting every HTTP response by endpoint and status into ``Metrics``.

    Args:
        app: the wrapped ASGI app.
        count: called as ``count(path, status)`` when a response starts.
    """

    def __init__(self, app: ASGIApp, count: Callable[[str, int], None]) -> None:
        self.app = app
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; count the status of its response."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.count(scope.get("path", ""), int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)
