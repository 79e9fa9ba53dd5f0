"""The ``moe-local`` app, its MODEL arguments, and the entry point (load flags: ``load_flags``).

Heavy imports (torch, transformers) live inside the command bodies so ``--help`` answers fast.
"""

from __future__ import annotations

import errno
import sys
from typing import Annotated

import typer

from moe_local import env
from moe_local.errors import MoeLocalError

app = typer.Typer(
    name="moe-local",
    help="Run large Mixture-of-Experts models locally, experts behind a cache.",
    epilog="Environment variables:\n\n" + env.describe().replace("\n", "\n\n"),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from moe_local._version import __version__

        typer.echo(f"moe-local {__version__}")
        raise typer.Exit


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit"),
    ] = False,
) -> None:
    """Run large Mixture-of-Experts models locally, experts behind a cache."""


ModelArg = Annotated[
    str, typer.Argument(help="checkpoint folder or a hub id in the local Hugging Face cache")
]
OptionalModelArg = Annotated[
    str | None,
    typer.Argument(help="checkpoint folder or cached hub id (default: the built-in demo model)"),
]
# Errors only a write can meet (the disk or the quota is full, the file too big): whatever was
# being written (standard output, --trace, --json), the user's disk is at fault, not our code.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _setup_torch() -> None:
    threads = env.threads()  # checked before torch is imported: a bad value costs no wait
    if threads:
        import torch

        torch.set_num_threads(threads)


def _one_line(text: str, limit: int | None = None) -> str:
    """``text`` on one line (an exception's message may span many), cut at ``limit`` characters."""
    line = "; ".join(part.strip() for part in text.splitlines() if part.strip())
    if limit is not None and len(line) > limit:
        line = line[: limit - 3] + "..."
    return line


def _err(message: str) -> None:
    typer.echo(f"error: {_one_line(message)}", err=True)


def main(argv: list[str] | None = None, prog_name: str | None = None) -> None:
    """Run the app in this process, turning user errors into one line and a non-zero exit.

    Args:
        argv: the arguments, command first (default: ``sys.argv[1:]``).
        prog_name: the program's name in usage lines (default: from ``sys.argv[0]``); the
            ``python -m moe_local.chat`` and ``python -m moe_local.server`` mains name themselves.

    Raises:
        SystemExit: always; 130 (with ``error: interrupted``) when Ctrl-C stopped the command.
    """
    from moe_local.cli import convert, hub, interrupt, run, tools  # noqa: F401  (they register commands)

    try:
        app(args=argv, prog_name=prog_name)
    except SystemExit as exc:
        if exc.code == interrupt.EXIT_CODE:  # typer's exit for a KeyboardInterrupt, or chat's
            interrupt.announce()
        raise
    except MoeLocalError as exc:
        _err(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # outside a command (typer turns one inside into exit 130)
        interrupt.announce()
        sys.exit(interrupt.EXIT_CODE)
    except Exception as exc:  # a bug: one line for the user, the traceback on request
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            _err(f"cannot write {exc.filename or 'the output'}: {exc.strerror}")
            sys.exit(1)
        if isinstance(exc, BrokenPipeError):  # | head: the reader left; say nothing, as typer does
            sys.exit(1)
        if env.DEBUG.get() == "1":
            raise
        detail = _one_line(str(exc), limit=300)
        _err(f"unexpected {type(exc).__name__}: {detail} (set MOE_LOCAL_DEBUG=1 for the traceback)")
        sys.exit(1)
