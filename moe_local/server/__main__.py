"""``python -m moe_local.server [MODEL] [OPTIONS]``: the same program as ``moe-local serve``.

Every option of ``moe-local serve`` (address, key, queue, and the load flags) works here too;
``python -m moe_local.server --help`` lists them.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Serve until interrupted; a user error is one ``error:`` line and a non-zero exit.

    Args:
        argv: the arguments after the program's name (default: ``sys.argv[1:]``).

    Raises:
        SystemExit: always, with the exit code (0 after a clean shutdown).
    """
    from moe_local.cli.app import main as run_app

    args = sys.argv[1:] if argv is None else argv
    run_app(["serve", *args], prog_name="python -m moe_local.server")


if __name__ == "__main__":
    main()
