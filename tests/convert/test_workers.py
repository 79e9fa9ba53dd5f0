"""Quantizing experts on worker threads: same bytes as one thread, bounded look-ahead, order kept."""

from __future__ import annotations

import threading
import time

import torch

from moe_local.convert.workers import ordered_map
from moe_local.convert.writer import quantize_checkpoint
from moe_local.recipes import load_recipe


def test_ordered_map_keeps_order_and_bounds_lookahead():
    taken: list[int] = []
    threads: set[str] = set()

    def items():
        for i in range(12):
            taken.append(i)
            yield (i,)

    def work(i: int) -> int:
        threads.add(threading.current_thread().name)
        assert torch.get_num_threads() == 1  # one torch thread per worker
        time.sleep(0.01 * (i % 3))  # finish out of order
        return i * i

    before = torch.get_num_threads()
    out = []
    for value in ordered_map(work, items(), workers=2):
        out.append(value)
        assert len(taken) <= len(out) + 3  # at most workers + 1 ahead of the consumer
    assert out == [i * i for i in range(12)]
    assert len(threads) == 2 and torch.get_num_threads() == before


def test_one_worker_runs_inline():
    names = list(ordered_map(lambda i: threading.current_thread().name, ((i,) for i in range(3)), 1))
    assert names == [threading.current_thread().name] * 3


def test_workers_write_the_same_bytes(tiny_mixtral, tmp_path, monkeypatch):
    recipe = load_recipe("experts-4bit")
    outs = []
    for workers in ("1", "2"):
        monkeypatch.setenv("MOE_LOCAL_THREADS", workers)
        out = tmp_path / f"q{workers}"
        quantize_checkpoint(tiny_mixtral, out, recipe)
        outs.append(out)
    for blob in (outs[0] / "experts").glob("*.bin"):
        assert blob.read_bytes() == (outs[1] / "experts" / blob.name).read_bytes(), blob.name
