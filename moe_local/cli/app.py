"""The ``moe-local`` app, the options its commands share, and the entry point.

Heavy imports (torch, transformers) live inside the command bodies so ``--help`` answers fast.
"""

from __future__ import annotations

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


def _setup_torch() -> None:
    import torch

    threads = env.THREADS.get()
    if threads:
        torch.set_num_threads(int(threads))


def _err(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


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
    """Entry point: run the app, turning user errors into one line and a non-zero exit."""
    try:
        app()
    except MoeLocalError as exc:
        _err(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(130)
    except Exception as exc:  # a bug: one line for the user, the traceback on request
        if env.DEBUG.get() == "1":
            raise
        _err(f"unexpected {type(exc).__name__}: {exc} (set MOE_LOCAL_DEBUG=1 for the traceback)")
        sys.exit(1)
