"""The one registry of MOE_LOCAL_* environment variables, shown in ``moe-local --help``."""

from __future__ import annotations

import os
from dataclasses import dataclass


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

DEBUG = EnvVar("MOE_LOCAL_DEBUG", "", "1: show the traceback of unexpected errors")

REGISTRY: tuple[EnvVar, ...] = (HOME, THREADS, DEBUG)


def home_dir():
    """The moe-local cache directory (``MOE_LOCAL_HOME``), expanded."""
    from pathlib import Path

    return Path(HOME.get()).expanduser()


def describe() -> str:
    """Return the registry as help text, one variable a line."""
    return "\n".join(f"{v.name} (default {v.default or 'unset'}): {v.help}" for v in REGISTRY)
