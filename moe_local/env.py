"""The one registry of MOE_LOCAL_* environment variables, shown in ``moe-local --help``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from moe_local.errors import MoeLocalError


@dataclass(frozen=True)
class EnvVar:
    """One environment variable moe-local reads."""

    name: str
    default: str
    help: str

    def get(self) -> str:
        """Return the variable's value, or its default when unset or empty."""
        return os.environ.get(self.name) or self.default


HOME = EnvVar(
    "MOE_LOCAL_HOME", "~/.cache/moe-local", "where measured bandwidths (and the demo model) are kept"
)
THREADS = EnvVar(
    "MOE_LOCAL_THREADS",
    "",
    "torch CPU threads and quantize workers (default: all cores; cores - 1 while experts stream from disk)",
)

MAX_THREADS = 1024

DEBUG = EnvVar("MOE_LOCAL_DEBUG", "", "1: show the traceback of unexpected errors")
NATIVE = EnvVar(
    "MOE_LOCAL_NATIVE",
    "1",
    "0: never build or use moe-local's C kernel for quantized weights on the CPU (torch's kernels instead)",
)

LEAN = EnvVar(
    "MOE_LOCAL_LEAN",
    "1",
    "0: decode Mixtral, Qwen-MoE and OLMoE models through transformers' forward, not moe-local's lean step",
)

PROGRESS_SECONDS = EnvVar(
    "MOE_LOCAL_PROGRESS_SECONDS", "10", "seconds between progress lines when stderr is not a terminal"
)

REGISTRY: tuple[EnvVar, ...] = (HOME, THREADS, DEBUG, NATIVE, LEAN, PROGRESS_SECONDS)


def threads() -> int | None:
    """``MOE_LOCAL_THREADS`` as a number of threads, or None when it is unset.

    Raises:
        MoeLocalError: the value is not a whole number from 1 to ``MAX_THREADS``.
    """
    text = THREADS.get().strip()
    if not text:
        return None
    # isdecimal: no sign, no "1e3"; the cap: torch starts every thread asked for, 100000 of them exhaust RAM
    if not text.isdecimal() or not 1 <= int(text) <= MAX_THREADS:
        raise MoeLocalError(
            f"{THREADS.name} must be a number of threads from 1 to {MAX_THREADS}, not {text!r}"
        )
    return int(text)


def usable_cores() -> int:
    """Cores to use: ``MOE_LOCAL_THREADS`` when set, else the cores this process may run on.

    Returns:
        At least 1.
    """
    asked = threads()
    if asked:
        return asked
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def home_dir() -> Path:
    """The moe-local cache directory (``MOE_LOCAL_HOME``), expanded.

    Raises:
        MoeLocalError: the value starts with ``~user`` for a user this system does not know.
    """
    value = HOME.get()
    try:
        return Path(value).expanduser()
    except RuntimeError as exc:  # "Could not determine home directory."
        raise MoeLocalError(f"{HOME.name}={value!r}: cannot expand {value.split('/')[0]!r}") from exc


def describe() -> str:
    """Return the registry as help text, one variable a line."""
    return "\n".join(f"{v.name} (default {v.default or 'unset'}): {v.help}" for v in REGISTRY)
