"""The load-time flags every model-loading command takes, defined once, and the one builder.

``@with_load_flags()`` appends the options to a command's signature (so Typer shows them) and
hands the command one frozen ``LoadFlags``; ``prepare_load`` turns that into the folder to load
and its ``LoadOptions``: flags checked first (a typo costs nothing), then the demo model where
MODEL was left out, the planner's expert budget, and ``--offload-dir`` staging, all before any
load. Per-request options (sampling, ``--max-tokens``) stay in each command's own signature.

This module imports only typer and the standard library: ``moe-local --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import typer

from moe_local.errors import MoeLocalError

if TYPE_CHECKING:
    from moe_local.config import LoadOptions

PANEL = "Load options"  # the --help section the load flags are listed under
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclasses.dataclass(frozen=True)
class LoadFlags:
    """Every load-time flag, as typed on the command line (sizes still text).

    Attributes:
        dtype: ``--dtype``: auto, float32, bfloat16 or float16.
        device: ``--device``: cpu, cuda or cuda:N (where the dense part computes).
        expert_memory: ``--expert-memory``: RAM for experts, e.g. ``2GiB`` (None: all in RAM).
        gpu_memory: ``--gpu-memory``: device memory for experts, with ``--device cuda``.
        cpu_memory: ``--cpu-memory``: RAM the whole process may use (None: what it holds plus 85% of
            what its memory limit leaves).
        context: ``--context``: tokens of context to plan the KV cache for.
        policy: ``--policy``: expert cache policy, lru or lfu.
        prefetch: ``--prefetch/--no-prefetch``: read the next layer's experts ahead.
        download: ``--download``: fetch a hub id that is not cached.
        offload_dir: ``--offload-dir``: fast-disk folder to stage the experts in first.
    """

    dtype: str = "auto"
    device: str = "cpu"
    expert_memory: str | None = None
    gpu_memory: str | None = None
    cpu_memory: str | None = None
    context: int = 4096
    policy: str = "lru"
    prefetch: bool = True
    download: bool = False
    offload_dir: str | None = None


# One Typer option per LoadFlags field; the defaults come from the dataclass.
_OPTIONS: dict[str, tuple[type | Any, typer.models.OptionInfo]] = {
    "dtype": (str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16")),
    "device": (str, typer.Option("--device", help="cpu, cuda or cuda:N")),
    "expert_memory": (
        str | None,
        typer.Option("--expert-memory", help="RAM for experts, e.g. 2GiB (default: all in RAM)"),
    ),
    "gpu_memory": (
        str | None,
        typer.Option("--gpu-memory", help="device memory for experts (with --device cuda)"),
    ),
    "cpu_memory": (
        str | None,
        typer.Option("--cpu-memory", help="RAM the whole process may use (default: 85% of what is free)"),
    ),
    "context": (int, typer.Option("--context", help="tokens of context to plan the KV cache for")),
    "policy": (str, typer.Option("--policy", help="expert cache policy: lru or lfu")),
    "prefetch": (
        bool,
        typer.Option("--prefetch/--no-prefetch", help="read the next layer's experts ahead"),
    ),
    "download": (bool, typer.Option("--download", help="fetch a hub id that is not cached (needs network)")),
    "offload_dir": (
        str | None,
        typer.Option("--offload-dir", help="fast-disk folder to stage the experts in once (one read each)"),
    ),
}
for _kind, _option in _OPTIONS.values():
    _option.rich_help_panel = PANEL  # grouped in --help, apart from the command's own options

LOAD_FLAGS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LoadFlags))
"""The names of every load flag (``LoadFlags`` fields, parameter names of the commands)."""


def option_help(name: str) -> str:
    """The help text of load flag ``name``."""
    return str(_OPTIONS[name][1].help)


def with_load_flags(
    *, omit: Iterable[str] = (), only: Iterable[str] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the load flags: Typer sees the options, the function gets ``flags: LoadFlags``.

    The decorated function takes a keyword parameter ``flags``; the options are appended to its
    signature as keyword-only parameters, so they never disturb its positional arguments.

    Args:
        omit: flags the command does not take (it supplies the value itself, e.g. bench's
            context); they keep the ``LoadFlags`` default.
        only: take just these flags (a command that reads a model without loading it).

    Returns:
        The decorator; the command it returns records its flags in ``__load_flags__``.

    Raises:
        ValueError: a name that is not a load flag, or a function without a ``flags`` parameter.
    """
    names = tuple(LOAD_FLAGS if only is None else only)
    skipped = set(omit)
    unknown = (set(names) | skipped) - set(LOAD_FLAGS)
    if unknown:
        raise ValueError(f"not load flags: {sorted(unknown)}")
    names = tuple(n for n in names if n not in skipped)
    defaults = LoadFlags()

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        base = inspect.signature(func, eval_str=True)
        if "flags" not in base.parameters:
            raise ValueError(f"{func.__name__} needs a 'flags' parameter to receive the LoadFlags")
        params = [p for p in base.parameters.values() if p.name != "flags"]
        for name in names:
            kind, info = _OPTIONS[name]
            params.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=getattr(defaults, name),
                    annotation=Annotated[kind, info],
                )
            )

        @functools.wraps(func)
        def command(*args: Any, **kwargs: Any) -> Any:
            flags = LoadFlags(**{name: kwargs.pop(name) for name in names if name in kwargs})
            return func(*args, flags=flags, **kwargs)

        command.__signature__ = base.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__load_flags__ = frozenset(names)  # type: ignore[attr-defined]
        return command

    return decorate


class LoadTarget(NamedTuple):
    """What ``prepare_load`` found: the folder to load, how, and the model as the user named it."""

    path: str | Path  # MODEL as given, the demo folder, or the staged copy under --offload-dir
    options: LoadOptions
    source: str | Path  # MODEL as given, or the demo folder (before staging): for names


def check_flags(flags: LoadFlags, *, context: int | None = None) -> LoadOptions:
    """Check every flag and build the LoadOptions they say, before anything is read or built.

    Args:
        flags: the command's load flags.
        context: the context to load with when the command sets it (bench, eval), else
            ``flags.context``.

    Returns:
        LoadOptions without the planner's budget (``prepare_load`` adds it).

    Raises:
        MoeLocalError: a bad value, or a device this machine does not have (one line).
    """
    from moe_local.config import DTYPE_NAMES, LoadOptions, check_host_budget

    if flags.dtype not in DTYPE_NAMES:
        raise MoeLocalError(f"unknown --dtype {flags.dtype!r}; choose {', '.join(DTYPE_NAMES)}")
    if not isinstance(flags.device, str) or not _DEVICE.fullmatch(flags.device):
        raise MoeLocalError(f"unknown --device {flags.device!r}; choose cpu, cuda or cuda:N")
    expert_memory = _size(flags.expert_memory, "--expert-memory")
    gpu_memory = _size(flags.gpu_memory, "--gpu-memory")
    cpu_memory = _size(flags.cpu_memory, "--cpu-memory")
    check_host_budget(cpu_memory, "--cpu-memory")
    _check_runtime_fits(cpu_memory)
    on_cpu = flags.device == "cpu"
    if on_cpu and gpu_memory is not None:
        raise MoeLocalError("--gpu-memory needs --device cuda; on cpu the expert budget is --expert-memory")
    # on a card --gpu-memory is the experts' budget there (--expert-memory when it is not given)
    budget = expert_memory if on_cpu or gpu_memory is None else gpu_memory
    return LoadOptions(  # checks the device (is it there?), the budget, the policy and the context
        dtype=flags.dtype,
        device=flags.device,
        expert_memory=budget,
        download=flags.download,
        context=flags.context if context is None else context,
        policy=flags.policy,
        prefetch=flags.prefetch,
    )


def _check_runtime_fits(cpu_memory: int | None) -> None:
    """Refuse a ``--cpu-memory``, or a memory limit on this process (cgroup, ``RLIMIT_AS``), below what
    the runtime alone holds (``memory.MIN_PROCESS_MEMORY``): before torch is imported, since under
    such a limit importing it is what the OOM killer would stop."""
    from moe_local.memory import MIN_PROCESS_MEMORY, memory_limit
    from moe_local.units import human_bytes

    limit = memory_limit()
    if limit < MIN_PROCESS_MEMORY:
        raise MoeLocalError(
            f"this process may use {human_bytes(limit)} (its memory limit), less than moe-local's runtime "
            f"alone holds (about {human_bytes(MIN_PROCESS_MEMORY)}: Python with torch, transformers and the "
            "model's classes, before any weight)"
        )

    if cpu_memory is not None and cpu_memory < MIN_PROCESS_MEMORY:
        raise MoeLocalError(
            f"--cpu-memory {human_bytes(cpu_memory)} is less than moe-local's runtime alone holds "
            f"(about {human_bytes(MIN_PROCESS_MEMORY)}: Python with torch, transformers and the model's "
            "classes, before any weight)"
        )


def prepare_load(flags: LoadFlags, model: str | None, *, context: int | None = None) -> LoadTarget:
    """The one way a command turns its load flags into what to load.

    In order: the flags are checked (``check_flags``); MODEL None becomes the built-in demo
    (built on first use); with ``--download`` a hub id is fetched; on the CPU, without an
    explicit budget, the planner picks the expert budget for this machine; with
    ``--offload-dir`` the experts are staged there (once) and the staged copy is what loads.
    Nothing is loaded here.

    Args:
        flags: the command's load flags.
        model: MODEL as given (a folder or a hub id), or None for the demo.
        context: the context to load and plan with when the command sets it (default
            ``flags.context``).

    Returns:
        The folder to pass to ``moe_local.loading.loader.load``, with its LoadOptions.

    Raises:
        MoeLocalError: a bad flag, a model that cannot be found or read, a budget no plan can
            use, or staging that fails (one line).
    """
    from moe_local.planner import planned_options
    from moe_local.units import parse_size

    options = check_flags(flags, context=context)
    source = model_or_demo(model)
    path: str | Path = source
    if flags.download:  # fetch first: the planner reads the files, and never downloads
        from moe_local.convert.staging import prepare

        path = prepare(source, None, download=True)
    if options.device == "cpu":  # the planner knows this machine's RAM, not a card's memory
        options, _ = planned_options(
            path, options, cpu_memory=parse_size(flags.cpu_memory), context=options.context
        )
    if flags.offload_dir is not None:  # after the plan: a budget that cannot work stages nothing
        from moe_local.convert.staging import prepare
        from moe_local.progress import progress_bars

        with progress_bars() as bar:
            path = prepare(path, flags.offload_dir, download=flags.download, progress=bar)
    return LoadTarget(path, options, source)


def model_or_demo(model: str | None) -> str:
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


def _size(text: str | None, flag: str) -> int | None:
    from moe_local.units import parse_size

    try:
        return parse_size(text)
    except MoeLocalError as exc:
        raise MoeLocalError(f"{flag}: {exc}") from exc
