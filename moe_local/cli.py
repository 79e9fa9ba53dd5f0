"""The ``moe-local`` command line: each command parses its options, then calls one public function.

Heavy imports (torch, transformers) live inside the command bodies so ``--help`` answers fast.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
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


def _planned_load_options(model, dtype, expert_memory, cpu_memory, context, policy, prefetch, download):
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
    )
    return planned_options(model, options, cpu_memory=parse_size(cpu_memory), context=context)[0]


@app.command(
    epilog="Example: moe-local generate ./Mixtral-8x7B-v0.1 'The capital of France is' --no-chat -n 32"
)
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(help="the prompt (use - to read it from standard input)")],
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
    dtype: DtypeOpt = "auto",
    expert_memory: ExpertMemOpt = None,
    cpu_memory: CpuMemOpt = None,
    context: ContextOpt = 4096,
    policy: PolicyOpt = "lru",
    prefetch: PrefetchOpt = True,
    download: DownloadOpt = False,
) -> None:
    """Generate text from a prompt, streamed to standard output."""
    from moe_local.config import SamplingParams
    from moe_local.generate import stream_generate
    from moe_local.loading.loader import load

    _setup_torch()
    if prompt == "-":
        prompt = sys.stdin.read()
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
    options = _planned_load_options(
        model, dtype, expert_memory, cpu_memory, context, policy, prefetch, download
    )
    lm = load(model, options)
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


def format_stats(resp, per_layer: bool = False) -> str:
    """Summary of a finished generation's speed and expert traffic (optionally per layer)."""
    from moe_local.inspect_model import human_bytes

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


@app.command(epilog="Example: moe-local inspect ./Mixtral-8x7B-v0.1")
def inspect(model: ModelArg, download: DownloadOpt = False) -> None:
    """Show a checkpoint's family, layers, experts, parameters and sizes (loads no weights)."""
    from rich.console import Console
    from rich.table import Table

    from moe_local.inspect_model import human_bytes, human_count, inspect_model

    info = inspect_model(model, download=download)
    table = Table(show_header=False, box=None)
    rows = [
        ("path", str(info.path)),
        ("family", f"{info.family} ({info.architecture})"),
        ("status", info.status),
        ("layers", f"{info.layers} ({info.moe_layers} with experts)"),
        ("experts", f"{info.experts_per_layer} per layer, top-{info.top_k} per token"),
        (
            "parameters",
            f"{human_count(info.total_params)} total, {human_count(info.active_params)} active per token",
        ),
        ("dense part", human_bytes(info.dense_bytes)),
        ("experts", human_bytes(info.expert_bytes)),
        ("dtype", ", ".join(info.dtypes)),
    ]
    for k, v in rows:
        table.add_row(f"[bold]{k}[/bold]", v)
    Console().print(table)


@app.command(epilog="Example: moe-local quantize ./Mixtral-8x7B-v0.1 ./mixtral-q4 --recipe experts-4bit")
def quantize(
    src: Annotated[str, typer.Argument(help="Hugging Face MoE checkpoint folder")],
    out: Annotated[str, typer.Argument(help="folder to create (written as OUT.partial, renamed when done)")],
    recipe: Annotated[str, typer.Option(help="shipped recipe name or a recipe .toml file")] = "experts-4bit",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing OUT")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan, write nothing")] = False,
    method: Annotated[
        str | None,
        typer.Option(
            help="rtn, hqq, gptq, or bitsandbytes nf4/fp4/int8: overrides how every quantized rule is made"
        ),
    ] = None,
    calibration: Annotated[str | None, typer.Option(help="plain-text file for --method gptq")] = None,
    calibration_tokens: Annotated[int, typer.Option(help="most calibration tokens")] = 4096,
    format: Annotated[
        str, typer.Option("--format", help="moe-local (default) or gptq (a GPTQModel/vLLM checkpoint)")
    ] = "moe-local",
    bits: Annotated[int, typer.Option(help="--format gptq: bits (2, 3, 4, 8)")] = 4,
    group_size: Annotated[int, typer.Option(help="--format gptq: group size (16, 32, 64, 128)")] = 128,
) -> None:
    """Quantize a MoE checkpoint into the moe-local format (streamed, a layer at a time)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from moe_local.format.writer import quantize_checkpoint
    from moe_local.inspect_model import human_bytes
    from moe_local.recipes import load_recipe

    _setup_torch()
    if format not in ("moe-local", "gptq"):
        raise MoeLocalError(f"unknown --format {format!r}; choose moe-local or gptq")
    if format == "gptq":
        _export_gptq(src, out, bits, group_size, overwrite, resume or dry_run or bool(method or calibration))
        return
    rec = load_recipe(recipe)
    if method is not None:
        if method not in ("rtn", "hqq", "gptq", "nf4", "fp4", "int8"):
            raise MoeLocalError(f"unknown method {method!r}; choose rtn, hqq, gptq, nf4, fp4 or int8")
        rec = rec.with_method(method)
    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
    )
    with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as bar:
        tasks: dict[str, int] = {}
        start = __import__("time").perf_counter()
        seen = [0]

        def progress(stage: str, done: int, total: int, nbytes: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, rate="")
            seen[0] += nbytes if stage != "dense" else 0
            rate = seen[0] / max(__import__("time").perf_counter() - start, 1e-9) / 1e6
            bar.update(tasks[stage], completed=done, rate=f"{rate:.1f} MB/s")

        report = quantize_checkpoint(
            src,
            out,
            rec,
            overwrite=overwrite,
            resume=resume,
            dry_run=dry_run,
            progress=progress,
            calibration=calibration,
            calibration_tokens=calibration_tokens,
        )
    table = Table(title=("plan" if dry_run else "quantized") + f" with recipe {rec.name}")
    for col in ("scheme", "tensors", "before", "after", "bits/weight", "rel. error"):
        table.add_column(col)
    for row in report.rows.values():
        bpw = 8 * row.bytes_out / max(row.params, 1)
        err = f"{row.rel_error_sum / row.measured:.4f}" if row.measured else "-"
        table.add_row(
            row.scheme,
            str(row.tensors),
            human_bytes(row.bytes_in),
            human_bytes(row.bytes_out),
            f"{bpw:.2f}",
            err,
        )
    Console().print(table)
    if report.tokens_per_expert:
        typer.echo(
            f"calibration: {report.calibration_tokens} tokens; tokens routed to each expert, by layer:"
        )
        for layer, seen in report.tokens_per_expert.items():
            typer.echo(f"  layer {layer}: " + " ".join(str(n) for n in seen))
    verb = "would write" if dry_run else "wrote"
    typer.echo(
        f"{verb} {human_bytes(report.bytes_out)} from {human_bytes(report.bytes_in)} "
        f"({report.experts} experts) in {report.seconds:.1f} s" + ("" if dry_run else f" to {report.out}")
    )


@app.command(
    epilog="Example: moe-local generate ./m 'Hello' --trace run.jsonl && moe-local trace run.jsonl --slots 64"
)
def trace(
    file: Annotated[str, typer.Argument(help="routing trace written by generate --trace")],
    slots: Annotated[int, typer.Option(help="cache size in experts (all layers together)")] = 16,
) -> None:
    """Replay a routing trace: hit rates of LRU, LFU and Belady's optimum for the same cache size."""
    from moe_local.experts.trace import read_trace, replay

    keys = read_trace(file)
    rates = replay(keys, slots)
    typer.echo(f"{len(keys)} expert uses, {len(set(keys))} distinct experts, {slots} slots")
    for policy, rate in rates.items():
        rel = f" ({rate / rates['belady']:.0%} of optimal)" if policy != "belady" and rates["belady"] else ""
        typer.echo(f"{policy:>7}: hit rate {rate:.1%}{rel}")


def _export_gptq(src: str, out: str, bits: int, group_size: int, overwrite: bool, extra: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from moe_local.format.gptq_export import export_gptq

    if extra:
        raise MoeLocalError(
            "--format gptq takes --bits and --group-size; not --resume, --dry-run or --method"
        )
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int, nbytes: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        path = export_gptq(src, out, bits, group_size, overwrite=overwrite, progress=progress)
    typer.echo(f"wrote a GPTQ checkpoint (int{bits}, groups of {group_size}) to {path}")


@app.command(epilog="Example: moe-local plan ./mixtral-q4 --gpu rtx4090 --context 8192")
def plan(
    model: ModelArg,
    gpu: Annotated[str, typer.Option(help="cpu, rtx4090, v100-16g or v100-32g")] = "cpu",
    gpu_memory: Annotated[str | None, typer.Option(help="device memory to use, e.g. 22GiB")] = None,
    cpu_memory: Annotated[
        str | None, typer.Option(help="host RAM to use (default: 85% of available)")
    ] = None,
    context: Annotated[int, typer.Option(help="tokens the KV cache must hold")] = 4096,
) -> None:
    """Show where the dense part, KV cache and experts would go, and the decode speed to expect."""
    from rich.console import Console
    from rich.table import Table

    from moe_local.config import parse_size
    from moe_local.inspect_model import human_bytes
    from moe_local.planner import plan_for

    p, info = plan_for(
        model, gpu=gpu, gpu_memory=parse_size(gpu_memory), cpu_memory=parse_size(cpu_memory), context=context
    )
    fast = "GPU" if gpu != "cpu" else "RAM (fast tier)"
    table = Table(title=f"{info.path.name} on {gpu}", show_header=True)
    for col in ("what", "where", "size"):
        table.add_column(col)
    table.add_row("dense part", fast, human_bytes(p.dense_bytes))
    table.add_row(f"KV cache ({p.context} tokens)", fast, human_bytes(p.kv_bytes))
    table.add_row(f"experts: {p.fast_slots} slots", fast, human_bytes(p.fast_slots * p.expert_bytes))
    if gpu != "cpu":
        table.add_row(f"experts: {p.ram_experts}", "host RAM", human_bytes(p.ram_experts * p.expert_bytes))
    table.add_row(
        f"experts: {p.disk_experts}", "disk (read on demand)", human_bytes(p.disk_experts * p.expert_bytes)
    )
    Console().print(table)
    lo, hi = p.tokens_per_s
    typer.echo(
        f"{p.total_experts} experts of {human_bytes(p.expert_bytes)}; "
        f"predicted decode {lo:.1f}-{hi:.1f} tokens/s "
        "(hit rate from the slot share up to twice it; measured bandwidths)"
    )


@app.command(epilog="Example: moe-local chat ./Qwen1.5-MoE-A2.7B-Chat --system 'You are terse.'")
def chat(
    model: ModelArg,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="most new tokens per reply")] = 512,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 0.7,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 0.95,
    top_k: Annotated[int, typer.Option(help="keep the k most likely tokens (0: all)")] = 0,
    min_p: Annotated[float, typer.Option(help="drop tokens below min_p x the top probability")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help=">1 discourages repeats")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    dtype: DtypeOpt = "auto",
    expert_memory: ExpertMemOpt = None,
    cpu_memory: CpuMemOpt = None,
    context: ContextOpt = 4096,
    policy: PolicyOpt = "lru",
    prefetch: PrefetchOpt = True,
    download: DownloadOpt = False,
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
    options = _planned_load_options(
        model, dtype, expert_memory, cpu_memory, context, policy, prefetch, download
    )
    raise typer.Exit(run_chat(model, system=system, params=params, load_options=options))


@app.command(
    name="eval", epilog="Example: moe-local eval ./mixtral-q4 ./mixtral-q3 --text valid.txt --max-tokens 8192"
)
def eval_(
    models: Annotated[list[str], typer.Argument(help="one or more model folders")],
    text: Annotated[str, typer.Option(help="plain-text file to score")],
    context: Annotated[
        int, typer.Option(help="window length; windows do not overlap (stride = context)")
    ] = 512,
    max_tokens: Annotated[int | None, typer.Option(help="score at most this many tokens")] = None,
    dtype: DtypeOpt = "auto",
    expert_memory: ExpertMemOpt = None,
) -> None:
    """Perplexity (and tokens/s) of one model, or a comparison table of several, on a text file."""
    from rich.console import Console
    from rich.table import Table

    from moe_local.config import LoadOptions, parse_size
    from moe_local.evaluate import evaluate_file
    from moe_local.loading.loader import load

    _setup_torch()
    results = []
    for model in models:
        lm = load(model, LoadOptions(dtype=dtype, expert_memory=parse_size(expert_memory)))
        results.append(evaluate_file(lm, text, context=context, max_tokens=max_tokens))
        del lm
    if len(results) == 1:
        r = results[0]
        typer.echo(f"perplexity: {r.perplexity:.4f}")
        typer.echo(f"tokens: {r.tokens} in windows of {r.context}, {r.tokens_per_s:.1f} tokens/s")
        return
    table = Table(title=f"perplexity on {text} (windows of {results[0].context})")
    for col in ("model", "perplexity", "tokens", "tokens/s", "expert hit rate"):
        table.add_column(col)
    for r in results:
        table.add_row(
            r.model, f"{r.perplexity:.4f}", str(r.tokens), f"{r.tokens_per_s:.1f}", f"{r.hit_rate:.1%}"
        )
    Console().print(table)


@app.command(epilog="Example: moe-local synth --like mixtral-8x7b --layers 4 ./mixtral-shaped")
def synth(
    out: Annotated[str, typer.Argument(help="folder to create")],
    like: Annotated[
        str,
        typer.Option(
            help="mixtral-8x7b, mixtral-8x22b, qwen3-30b-a3b, deepseek-v2-lite, "
            "gpt-oss-20b, or a config.json path"
        ),
    ],
    layers: Annotated[int | None, typer.Option(help="keep only the first N layers")] = None,
    recipe: Annotated[str, typer.Option(help="bit widths of the moe-local format")] = "experts-4bit",
    format: Annotated[str, typer.Option("--format", help="moe-local or hf (bf16 safetensors)")] = "moe-local",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing OUT")] = False,
) -> None:
    """Write a random-weight checkpoint with the real dimensions of a known MoE model."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from moe_local.inspect_model import human_bytes
    from moe_local.recipes import load_recipe
    from moe_local.synth import synth as run_synth

    rec = load_recipe(recipe)
    written = [0]
    t0 = time.perf_counter()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
    )
    with Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int, nbytes: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, rate="")
            written[0] += nbytes
            rate = written[0] / max(time.perf_counter() - t0, 1e-9) / 1e6
            bar.update(tasks[stage], completed=done, rate=f"{rate:.0f} MB/s")

        path = run_synth(
            like, out, layers=layers, recipe=rec, fmt=format, overwrite=overwrite, progress=progress
        )
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    seconds = time.perf_counter() - t0
    typer.echo(f"wrote {human_bytes(size)} to {path} in {seconds:.1f} s ({size / seconds / 1e6:.0f} MB/s)")


@app.command(epilog="Example: moe-local bench ./mixtral-shaped --cpu-memory 8GiB --json run.json")
def bench(
    model: ModelArg,
    prompt_tokens: Annotated[int, typer.Option(help="prompt length")] = 512,
    new_tokens: Annotated[int, typer.Option(help="tokens to decode")] = 128,
    expert_memory: ExpertMemOpt = None,
    cpu_memory: CpuMemOpt = None,
    gpu_memory: Annotated[
        str | None, typer.Option(help="device memory for experts (with --device cuda)")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    policy: PolicyOpt = "lru",
    prefetch: PrefetchOpt = True,
    json_file: Annotated[str | None, typer.Option("--json", help="also write the results as JSON")] = None,
) -> None:
    """Measure prefill and decode speed, expert traffic and the floor they are bounded by."""
    import dataclasses
    import json

    from moe_local.bench import bench as run_bench
    from moe_local.bench import format_table
    from moe_local.config import LoadOptions, parse_size
    from moe_local.planner import planned_options

    _setup_torch()
    budget = parse_size(gpu_memory) if device != "cpu" and gpu_memory else parse_size(expert_memory)
    options = LoadOptions(device=device, expert_memory=budget, policy=policy, prefetch=prefetch,
                          context=prompt_tokens + new_tokens + 1)  # fmt: skip
    if device == "cpu":
        options, _ = planned_options(
            model, options, cpu_memory=parse_size(cpu_memory), context=options.context
        )
    result = run_bench(model, options, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    typer.echo(format_table(result))
    if json_file:
        Path(json_file).write_text(json.dumps(dataclasses.asdict(result), indent=1))


@app.command(epilog="Example: moe-local serve ./Mixtral-8x7B-v0.1 --port 8000 --api-key secret")
def serve(
    model: ModelArg,
    host: Annotated[str, typer.Option(help="address to bind (default: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="require 'Authorization: Bearer KEY' (all but /health)")
    ] = None,
    max_queue: Annotated[int, typer.Option(help="requests that may wait for the model; more get 429")] = 16,
    model_name: Annotated[
        str | None, typer.Option(help="name clients pass as model (default: folder name)")
    ] = None,
    log_level: Annotated[str, typer.Option(help="critical, error, warning, info or debug")] = "info",
    dtype: DtypeOpt = "auto",
    expert_memory: ExpertMemOpt = None,
    cpu_memory: CpuMemOpt = None,
    context: ContextOpt = 4096,
    policy: PolicyOpt = "lru",
    prefetch: PrefetchOpt = True,
    download: DownloadOpt = False,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming, metrics)."""
    from moe_local.server import serve as run_server

    _setup_torch()
    options = _planned_load_options(
        model, dtype, expert_memory, cpu_memory, context, policy, prefetch, download
    )
    run_server(
        model,
        host=host,
        port=port,
        api_key=api_key,
        max_queue=max_queue,
        load_options=options,
        model_name=model_name,
        log_level=log_level,
    )


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
