"""The ``moe-local`` app, the options its commands share, and the entry point.

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

ModelArg = Annotated[
    str, typer.Argument(help="checkpoint folder or a hub id in the local Hugging Face cache")
]
OptionalModelArg = Annotated[
    str | None,
    typer.Argument(help="checkpoint folder or cached hub id (default: the built-in demo model)"),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16")]
ExpertMemOpt = Annotated[
    str | None, typer.Option("--expert-memory", help="RAM for experts, e.g. 2GiB (default: all in RAM)")
]
CpuMemOpt = Annotated[
    str | None, typer.Option("--cpu-memory", help="host RAM the planner may use (default: 85% of available)")
]
ContextOpt = Annotated[int, typer.Option(help="tokens of context to plan the KV cache for")]
PolicyOpt = Annotated[str, typer.Option(help="expert cache policy: lru or lfu")]
PrefetchOpt = Annotated[
    bool, typer.Option("--prefetch/--no-prefetch", help="read the next layer's experts ahead")
]
OffloadDirOpt = Annotated[
    str | None,
    typer.Option("--offload-dir", help="fast-disk folder to stage the experts in once (one read each)"),
]
DownloadOpt = Annotated[
    bool, typer.Option("--download", help="fetch a hub id that is not cached (needs network)")
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


def _model_or_demo(model: str | None) -> str:
    """MODEL as given, or the built-in demo model (built on first use, with progress bars)."""
    if model is not None:
        return model
    from moe_local.demo import demo_path, ensure_demo, is_ready
    from moe_local.progress import progress_bars

    if not is_ready(demo_path()):
        typer.echo("building the demo model (once; about 2 minutes on 2 cores)...", err=True)
    with progress_bars() as bar:
        path = ensure_demo(progress=bar)
    typer.echo(f"model: the built-in demo ({path})", err=True)
    return str(path)


def _planned_load_options(
    model, dtype, expert_memory, cpu_memory, context, policy, prefetch, download, offload_dir=None
):
    """LoadOptions from the shared flags, with the planner's expert budget unless one was given."""
    from moe_local.config import LoadOptions, parse_size
    from moe_local.planner import planned_options

    options = LoadOptions(
        dtype=dtype,
        expert_memory=parse_size(expert_memory),
        download=download,
        policy=policy,
        prefetch=prefetch,
        context=context,
        offload_dir=offload_dir,
    )
    return planned_options(model, options, cpu_memory=parse_size(cpu_memory), context=context)[0]


def main() -> None:
    """Run the app in this process, turning user errors into one line and a non-zero exit.

    Raises:
        SystemExit: always; 130 (with ``error: interrupted``) when Ctrl-C stopped the command.
    """
    from moe_local.cli import interrupt, run, tools  # noqa: F401  (run and tools register the commands)

    try:
        app()
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
