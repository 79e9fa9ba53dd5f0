"""The ``moe-local`` command line: each command parses its options, then calls one public function."""

from moe_local.cli import run, tools  # noqa: F401  (registers the commands, in help order)
from moe_local.cli.app import app, main

__all__ = ["app", "main"]
