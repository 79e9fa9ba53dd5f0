"""The ``moe-local`` command line: each command parses its options, then calls one public function.

The program starts in ``moe_local.cli.interrupt.entry``, which guards Ctrl-C before anything heavy
is imported; so this package imports nothing at all until ``main`` runs (the app and its commands
live in ``moe_local.cli.app``, ``moe_local.cli.run`` and ``moe_local.cli.tools``).
"""

from __future__ import annotations

__all__ = ["main"]


def main() -> None:
    """Run the CLI on ``sys.argv`` in this process; user errors exit with one line (SystemExit).

    The ``moe-local`` program is ``moe_local.cli.interrupt.entry``: the same, with Ctrl-C guarded.
    """
    from moe_local.cli.app import main as run_app

    run_app()
