"""Routing traces: record which experts each layer used at each step, and replay them.

A trace is JSON lines ``{"step": s, "layer": l, "experts": [...]}``; replaying it through
LRU, LFU and Belady's optimum tells how good a cache of N slots could be on that workload.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from moe_local.errors import MoeLocalError
from moe_local.experts.module import OffloadedExperts
from moe_local.experts.policy import Key, simulate


class TraceRecorder:
    """Records the routed experts of every layer of a loaded model, step by step.

    Args:
        model: a model whose experts are OffloadedExperts.
        out: an open text file the JSON lines go to.
    """

    def __init__(self, model, out: TextIO) -> None:
        self.out = out
        self.modules = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
        for m in self.modules:
            m.trace = []

    def flush(self, step: int) -> None:
        """Write what every layer routed since the last flush as step ``step``."""
        for m in self.modules:
            for experts in m.trace or []:
                self.out.write(json.dumps({"step": step, "layer": m.layer, "experts": experts}) + "\n")
            m.trace = []

    def close(self) -> None:
        """Stop recording."""
        for m in self.modules:
            m.trace = None


def read_trace(path: str | Path) -> list[Key]:
    """Read a trace file into the sequence of expert uses, in step and layer order.

    Raises:
        MoeLocalError: the file is missing or a line is not a trace record (names the line).
    """
    keys: list[Key] = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    keys.extend((int(rec["layer"]), int(e)) for e in rec["experts"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError) as exc:
                    raise MoeLocalError(f"{path}: line {n} is not a trace record") from exc
    except UnicodeDecodeError as exc:
        raise MoeLocalError(f"{path} is not a trace file (not UTF-8 text)") from exc
    except OSError as exc:
        raise MoeLocalError(f"cannot read trace {path}: {exc.strerror}") from exc
    if not keys:
        raise MoeLocalError(f"{path} holds no expert uses")
    return keys


def replay(keys: list[Key], slots: int, policies: tuple[str, ...] = ("lru", "lfu", "belady")) -> dict:
    """Hit rate of each policy on ``keys`` with a cache of ``slots`` experts."""
    if slots < 1:
        raise MoeLocalError("--slots must be at least 1")
    return {p: simulate(keys, slots, p)[0] / len(keys) for p in policies}
