"""Commands that run a model: ``generate``, ``chat``, ``serve`` and ``demo``."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from moe_local.cli import load_flags
from moe_local.cli.app import OptionalModelArg, _setup_torch, app
from moe_local.cli.load_flags import LoadFlags, check_flags, prepare_load, with_load_flags


@app.command(
    epilog="Example: moe-local generate ./Mixtral-8x7B-v0.1 'The capital of France is' --no-chat -n 32"
    "\n\nWith only a prompt it runs the built-in demo: moe-local generate 'What is the capital of France?'"
)
@with_load_flags()
def generate(
    model: Annotated[
        str, typer.Argument(help="checkpoint folder or cached hub id; omit it to use the built-in demo")
    ],
    prompt: Annotated[
        str | None, typer.Argument(help="the prompt (use - to read it from standard input)")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="most new tokens")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 1.0,
    top_k: Annotated[int, typer.Option(help="keep the k most likely tokens (0: all)")] = 0,
    min_p: Annotated[float, typer.Option(help="drop tokens below min_p x the top probability")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help=">1 discourages repeats")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    chat: Annotated[
        bool | None,
        typer.Option("--chat/--no-chat", help="apply the chat template (default: if the model has one)"),
    ] = None,
    stats: Annotated[
        bool, typer.Option("--stats", help="print speed and expert-cache stats after the text")
    ] = False,
    trace: Annotated[
        str | None, typer.Option(help="write the routing trace (JSON lines) to this file")
    ] = None,
    *,
    flags: LoadFlags,
) -> None:
    """Generate text from a prompt, streamed to standard output."""
    from moe_local.config import SamplingParams
    from moe_local.generation import stream_generate
    from moe_local.loading.loader import load

    _setup_torch()
    if prompt is None:  # one argument: it is the prompt, and the model is the demo
        model, prompt = None, model
    if prompt == "-":
        prompt = _read_stdin()
    if trace:
        from moe_local.convert.outdir import check_output_file

        check_output_file(trace, "--trace")  # before the load, not after it
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop or ()),
    )
    target = prepare_load(flags, model)
    lm = load(target.path, target.options)
    last = None
    with contextlib.ExitStack() as stack:
        recorder = None
        if trace:
            from moe_local.experts.trace import TraceRecorder

            recorder = TraceRecorder(lm.model, stack.enter_context(open(trace, "w")))
        for step, last in enumerate(stream_generate(lm, prompt, params, chat=chat)):
            sys.stdout.write(last.text)
            sys.stdout.flush()
            if recorder:
                recorder.flush(step)
    sys.stdout.write("\n")
    if stats and last is not None:
        typer.echo(format_stats(last, per_layer=True), err=True)


def _read_stdin() -> str:
    """The prompt from standard input; bytes that are not UTF-8 become U+FFFD instead of an error."""
    from moe_local.errors import MoeLocalError

    if sys.stdin is None:
        raise MoeLocalError("standard input is closed: nothing to read for the prompt '-'")
    stream = getattr(sys.stdin, "buffer", None)
    return stream.read().decode("utf-8", errors="replace") if stream is not None else sys.stdin.read()


def format_stats(resp, per_layer: bool = False) -> str:
    """Summary of a finished generation's speed and expert traffic (optionally per layer)."""
    from moe_local.units import human_bytes

    t = resp.experts.total
    lines = []
    if per_layer and resp.experts.layers:
        lines.append("layer  hits  misses  evictions  read      prefetched/used  guess accuracy")
        for layer, s in sorted(resp.experts.layers.items()):
            acc = f"{s.guessed_right / s.guessed:.0%}" if s.guessed else "-"
            lines.append(
                f"{layer:5d} {s.hits:5d} {s.misses:7d} {s.evictions:10d}  "
                f"{human_bytes(s.bytes_from_disk):>8}  "
                f"{s.prefetched:6d}/{s.prefetch_used:<6d}   {acc}"
            )
    guess = f", prefetch guesses right {resp.experts.prefetch_accuracy:.0%}" if t.guessed else ""
    return (
        "\n".join(lines)
        + ("\n" if lines else "")
        + (
            f"prompt: {resp.prompt_tokens} tokens at {resp.prompt_tps:.1f} tok/s, "
            f"time to first token {resp.ttft_s * 1000:.0f} ms\n"
            f"generation: {resp.generation_tokens} tokens at {resp.generation_tps:.1f} tok/s "
            f"(finish: {resp.finish_reason})\n"
            f"experts: {t.hits} hits, {t.misses} misses, hit rate {resp.experts.hit_rate:.1%}, "
            f"{t.evictions} evictions, read {human_bytes(t.bytes_from_disk)} from disk, "
            f"I/O wait {t.io_wait_s * 1000:.0f} ms{guess}"
        )
    )


@app.command(epilog="Example: moe-local chat ./Qwen1.5-MoE-A2.7B-Chat --system 'You are terse.'")
@with_load_flags()
def chat(
    model: OptionalModelArg = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="most new tokens per reply")] = 512,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 0.7,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 0.95,
    top_k: Annotated[int, typer.Option(help="keep the k most likely tokens (0: all)")] = 0,
    min_p: Annotated[float, typer.Option(help="drop tokens below min_p x the top probability")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help=">1 discourages repeats")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    *,
    flags: LoadFlags,
) -> None:
    """Chat with a model in the terminal: streamed multi-turn replies, /help lists the commands."""
    from moe_local.chat import chat as run_chat
    from moe_local.config import SamplingParams

    _setup_torch()
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    target = prepare_load(flags, model)
    raise typer.Exit(run_chat(target.path, system=system, params=params, load_options=target.options))


@app.command(epilog="Example: moe-local serve ./Mixtral-8x7B-v0.1 --port 8000 --api-key secret")
@with_load_flags()
def serve(
    model: OptionalModelArg = None,
    host: Annotated[str, typer.Option(help="address to bind (default: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="require 'Authorization: Bearer KEY' (all but /health)")
    ] = None,
    max_queue: Annotated[int, typer.Option(help="requests that may wait for the model; more get 429")] = 16,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel", "-np", help="generations decoded together (continuous batching); 1: one at a time"
        ),
    ] = 1,
    model_name: Annotated[
        str | None, typer.Option(help="name clients pass as model (default: folder name)")
    ] = None,
    log_level: Annotated[str, typer.Option(help="critical, error, warning, info or debug")] = "info",
    cors_origin: Annotated[
        str | None,
        typer.Option(
            "--cors-origin", help="let this browser origin call the server (e.g. http://localhost:3000, or *)"
        ),
    ] = None,
    *,
    flags: LoadFlags,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming, metrics)."""
    from moe_local.server import serve as run_server
    from moe_local.server.cors import check_cors_origin
    from moe_local.server.listen import check_api_key, check_listen, check_log_level

    # before the demo build or any load: a bad address should cost nothing
    check_log_level(log_level)
    check_api_key(api_key)
    check_cors_origin(cors_origin)
    check_listen(host, port)
    if parallel < 1:
        from moe_local.errors import MoeLocalError

        raise MoeLocalError(f"--parallel must be at least 1 (got {parallel})")
    options = check_flags(flags)  # a bad flag is its own line; what fails after it is the model's load
    _setup_torch()
    source = load_flags.model_or_demo(model)  # built before the port opens: the name is its folder's
    if not flags.download:  # a broken config fails here, before the port opens (a download cannot)
        _check_config(source)

    def prepare():  # the planner and --offload-dir staging run while /health answers 503
        target = prepare_load(flags, source)
        return target.path, target.options

    run_server(
        source,
        host=host,
        port=port,
        api_key=api_key,
        max_queue=max_queue,
        parallel=parallel,
        load_options=options,
        model_name=model_name or _served_name(source),
        log_level=log_level,
        prepare=prepare,
        cors_origin=cors_origin,
    )


def _check_config(model: str | Path) -> None:
    """Read and check MODEL's config.json (fast: no weights), in the words of a failed load."""
    from moe_local.errors import MoeLocalError
    from moe_local.loading.checkpoint import load_config
    from moe_local.loading.resolve import resolve_model_path

    try:
        load_config(resolve_model_path(model))
    except MoeLocalError as exc:
        raise MoeLocalError(f"cannot load {model}: {exc}") from exc


def _served_name(model: str | Path) -> str:
    """The name clients see: the folder's name, or the hub id as typed (not a staged copy's name)."""
    path = Path(str(model))
    return path.name if path.exists() else str(model)


@app.command(epilog="Example: moe-local demo   (then: moe-local chat)")
def demo(
    rebuild: Annotated[bool, typer.Option("--rebuild", help="build again even if it is there")] = False,
    keep_source: Annotated[
        bool, typer.Option("--keep-source", help="also keep the bf16 checkpoint (1.3 GB)")
    ] = False,
    layers: Annotated[
        int | None, typer.Option(help="build only the first N of 30 layers (a quick try)")
    ] = None,
    recipe: Annotated[str, typer.Option(help="shipped recipe name or recipe file")] = "experts-4bit",
) -> None:
    """Build the built-in demo MoE (SmolLM2-135M upcycled to 8 experts) once and print its folder."""
    from moe_local.demo import demo_path, ensure_demo, is_ready
    from moe_local.progress import progress_bars

    _setup_torch()
    ready = is_ready(demo_path(layers=layers, recipe=recipe), layers, recipe)
    if rebuild or not ready:
        typer.echo("building the demo model (once; about 2 minutes on 2 cores)...", err=True)
    with progress_bars() as bar:
        path = ensure_demo(
            layers=layers, recipe=recipe, keep_source=keep_source, rebuild=rebuild, progress=bar
        )
    if keep_source:
        from moe_local.demo import DemoConfig, demo_dir

        typer.echo(f"bf16 source: {demo_dir() / DemoConfig(layers=layers).folder_name()}", err=True)
    typer.echo(str(path))
