"""Quantizing experts on several cores: one expert per worker thread, one torch thread each.

Quantizing is hundreds of small elementwise torch ops per chunk. With torch's own intra-op
threads every op ends at an OpenMP barrier, and on a busy 2-core machine the sibling thread spins
there whenever the other core is taken (measured 8-17x slower). Experts are independent, so
quantizing one per Python thread with one torch thread each uses the cores without barriers;
torch releases the GIL inside its ops.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def worker_count() -> int:
    """Workers for quantizing: one per usable core (``moe_local.env.usable_cores``)."""
    from moe_local import env

    return env.usable_cores()


@contextlib.contextmanager
def single_torch_thread(active: bool) -> Iterator[None]:
    """Run the block with one torch intra-op thread (when ``active``), restoring the count after."""
    import torch

    before = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ordered_map(fn: Callable[..., T], items: Iterable[tuple], workers: int | None = None) -> Iterator[T]:
    """``fn(*item)`` for each item on ``workers`` threads, yielded in the items' order.

    At most ``workers + 1`` items are taken from ``items`` ahead of the consumer, so memory stays
    bounded by a few experts however many a layer has.

    Args:
        fn: the work for one item.
        items: argument tuples, consumed lazily.
        workers: threads (default ``worker_count()``); 1 runs inline.

    Yields:
        The results, in order.
    """
    workers = worker_count() if workers is None else workers
    if workers <= 1:
        for item in items:
            yield fn(*item)
        return
    with single_torch_thread(True), ThreadPoolExecutor(workers, thread_name_prefix="quantize") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, *item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
