"""Commands that prepare and measure models: ``inspect``, ``quantize``, ``trace``, ``plan``,
``eval``, ``synth`` and ``bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_local.cli.app import ModelArg, _setup_torch, app
from moe_local.cli.load_flags import LoadFlags, prepare_load, with_load_flags
from moe_local.errors import MoeLocalError


@app.command(epilog="Example: moe-local inspect ./Mixtral-8x7B-v0.1")
@with_load_flags(only=("download",))
def inspect(model: ModelArg, *, flags: LoadFlags) -> None:
    """Show a checkpoint's family, layers, experts, parameters and sizes (loads no weights)."""
    from rich.console import Console
    from rich.table import Table

    from moe_local.inspection import inspect_model
    from moe_local.units import human_bytes, human_count

    info = inspect_model(model, download=flags.download)
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
    recipe: Annotated[
        str | None,
        typer.Option(
            help="shipped recipe (q8 q6 q5 q4 q3 q2 from best to smallest, experts-4bit, all-4bit, "
            "mixtral-4090, v100-int8, tiny-2bit) or a recipe .toml file [default: experts-4bit]"
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing OUT")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan, write nothing")] = False,
    method: Annotated[
        str | None,
        typer.Option(
            help="rtn, hqq, gptq, or bitsandbytes nf4/fp4/int8: overrides how every quantized rule is made"
        ),
    ] = None,
    calibration: Annotated[
        str | None, typer.Option(help="plain-text file for --method gptq, or for --imatrix")
    ] = None,
    imatrix: Annotated[
        bool,
        typer.Option(
            "--imatrix",
            help="rtn and hqq rules weight their rounding by each input channel's mean square on "
            "--calibration text (the imatrix idea); gptq rules are unchanged",
        ),
    ] = False,
    act_order: Annotated[
        bool,
        typer.Option(
            "--act-order",
            help="gptq rules visit input columns by decreasing Hessian diagonal, each group's scale "
            "and zero fixed from the original weights first (static groups; stored as usual)",
        ),
    ] = False,
    calibration_tokens: Annotated[
        int | None, typer.Option(help="most calibration tokens [default: 4096]")
    ] = None,
    format: Annotated[
        str, typer.Option("--format", help="moe-local (default) or gptq (a GPTQModel/vLLM checkpoint)")
    ] = "moe-local",
    bits: Annotated[
        int | None,
        typer.Option(
            help="the experts' bits (2, 3, 4, 8) over the recipe's; --format gptq: all [default: 4]"
        ),
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option(
            help="the experts' group size (16, 32, 64, 128) over the recipe's; "
            "--format gptq: all [default: 128]"
        ),
    ] = None,
    gpu: Annotated[
        str | None,
        typer.Option(help="also say whether the result fits this card: rtx4090, v100-16g or v100-32g"),
    ] = None,
    gptq_names: Annotated[
        str | None,
        typer.Option(
            help="--format gptq: tensor names, source (vLLM, SGLang) or gptqmodel (GPTQModel) "
            "[default: source]"
        ),
    ] = None,
    sym: Annotated[
        bool | None,
        typer.Option(
            "--sym/--asym",
            help="--format gptq: symmetric (what vLLM's and SGLang's Marlin kernels take) or with a zero "
            "point per group (vLLM then needs --quantization moe_wna16 --dtype float16) [default: --sym]",
        ),
    ] = None,
) -> None:
    """Quantize a MoE checkpoint into the moe-local format (streamed, a layer at a time)."""
    from moe_local.convert.writer import quantize_checkpoint
    from moe_local.progress import progress_bars

    _setup_torch()
    if format not in ("moe-local", "gptq"):
        raise MoeLocalError(f"unknown --format {format!r}; choose moe-local or gptq")
    given = {
        "--recipe": recipe is not None,
        "--resume": resume,
        "--dry-run": dry_run,
        "--method": method is not None,
        "--calibration": calibration is not None,
        "--calibration-tokens": calibration_tokens is not None,
        "--imatrix": imatrix,
        "--act-order": act_order,
        "--gpu": gpu is not None,
        "--gptq-names": gptq_names is not None,
        "--sym/--asym": sym is not None,
    }
    gptq_only = ("--gptq-names", "--sym/--asym")
    if format == "gptq":
        not_gptq = {k: v for k, v in given.items() if k not in gptq_only}
        takes = "it takes --bits, --group-size, --gptq-names, --sym/--asym, --overwrite"
        _refuse_flags(not_gptq, takes, "--format gptq")
        names = gptq_names or "source"
        _export_gptq(
            src, out, 4 if bits is None else bits, group_size or 128, names, overwrite, sym is not False
        )
        return
    _refuse_flags({k: given[k] for k in gptq_only}, "that is for --format gptq", "--format moe-local")
    rec = _effective_recipe(recipe or "experts-4bit", method, bits, group_size)
    if imatrix and calibration is None:
        raise MoeLocalError("--imatrix measures importance on calibration text: add --calibration FILE")
    if imatrix and not _has_weighted(rec):
        raise MoeLocalError(
            "--imatrix weights rtn and hqq rules; this recipe has none (add --method rtn or hqq)"
        )
    if act_order and not _has_gptq(rec):
        raise MoeLocalError("--act-order applies to gptq rules; this recipe has none (add --method gptq)")
    if (calibration is not None or calibration_tokens is not None) and not (
        _has_gptq(rec) or imatrix or rec.has_choices
    ):
        flag = "--calibration" if calibration is not None else "--calibration-tokens"
        raise MoeLocalError(
            f"{flag} is for gptq rules, --imatrix or a recipe's choose rules: add --method gptq or "
            "--imatrix, or use a recipe with -gptq schemes"
        )
    from moe_local.planner import GPUS

    if gpu is not None and gpu not in GPUS:
        raise MoeLocalError(f"unknown --gpu {gpu!r}; choose {', '.join(GPUS)}")
    with progress_bars() as bar:

        def progress(stage: str, done: int, total: int, nbytes: int) -> None:
            bar(stage, done, total, 0 if stage == "dense" else nbytes)  # MB/s counts expert input

        report = quantize_checkpoint(
            src,
            out,
            rec,
            overwrite=overwrite,
            resume=resume,
            dry_run=dry_run,
            progress=progress,
            calibration=calibration,
            calibration_tokens=4096 if calibration_tokens is None else calibration_tokens,
            imatrix=imatrix,
            act_order=act_order,
        )
    _print_summary(report, rec, gpu)


def _refuse_flags(given: dict[str, bool], takes: str, where: str) -> None:
    """One line for a flag that ``where`` (the chosen format) does not take: never ignored."""
    wrong = [flag for flag, used in given.items() if used]
    if wrong:
        raise MoeLocalError(f"{where} does not take {', '.join(wrong)}; {takes}")


def _effective_recipe(name: str, method: str | None, bits: int | None, group_size: int | None):
    """The recipe; ``--method`` over every quantized rule, ``--bits``/``--group-size`` over the experts."""
    from moe_local.recipes import load_recipe

    rec = load_recipe(name)
    if method is not None:
        if method not in ("rtn", "hqq", "gptq", "nf4", "fp4", "int8"):
            raise MoeLocalError(f"unknown method {method!r}; choose rtn, hqq, gptq, nf4, fp4 or int8")
        rec = rec.with_method(method)
    return rec.with_experts(bits, group_size)


def _has_gptq(rec) -> bool:
    return any(getattr(r.scheme, "method", None) == "gptq" for r in rec.rules)


def _has_weighted(rec) -> bool:
    """Whether a rule of ``rec`` is group-wise rtn or hqq (what ``--imatrix`` weights)."""
    return any(getattr(r.scheme, "method", None) in ("rtn", "hqq") for r in rec.rules)


def _print_summary(report, rec, gpu: str | None) -> None:
    """The per-scheme table (fallbacks in rows of their own), the effective rules, the totals."""
    from rich.console import Console
    from rich.table import Table

    from moe_local.convert.writer import FALLBACK_ROW
    from moe_local.units import human_bytes

    dry_run = report.dry_run
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
    fallback = FALLBACK_ROW.split("{")[0]
    for row in report.rows.values():
        if row.scheme.startswith(fallback):
            typer.echo(f"{row.scheme}: {row.tensors} tensors kept: no group size divides their width")
    typer.echo(f"rules: {rec.describe()}")
    if report.tokens_per_expert:
        typer.echo(
            f"calibration: {report.calibration_tokens} tokens; tokens routed to each expert, by layer:"
        )
        for layer, seen in report.tokens_per_expert.items():
            typer.echo(f"  layer {layer}: " + " ".join(str(n) for n in seen))
    if report.allocation is not None:
        typer.echo(f"allocation ({report.allocation.measured_on}): {report.allocation.summary()}")
    elif dry_run and rec.has_choices:
        typer.echo("choose rules are measured when quantizing: the plan sizes them at their nearest scheme")
    if gpu is not None:
        typer.echo(_fits_line(report, gpu))
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


def _fits_line(report, gpu: str) -> str:
    """Whether the quantized model fits ``gpu`` whole, or with experts offloaded (dense part on it)."""
    from moe_local.planner import DEVICE_OVERHEAD, GPUS
    from moe_local.units import human_bytes

    card = GPUS[gpu][0]
    usable = card - DEVICE_OVERHEAD
    total = report.bytes_out
    experts = total - report.dense_bytes_out
    if total <= usable:
        return f"fits {gpu} whole: {human_bytes(total)} of {human_bytes(usable)} usable (before the KV cache)"
    if report.dense_bytes_out <= usable:
        slots = (usable - report.dense_bytes_out) / max(experts / max(report.experts, 1), 1)
        return (
            f"does not fit {gpu} whole ({human_bytes(total)}, {human_bytes(total - usable)} over); with "
            f"experts offloaded the dense part ({human_bytes(report.dense_bytes_out)}) fits and about "
            f"{int(slots)} of {report.experts} experts stay on the card"
        )
    return f"does not fit {gpu}: the dense part alone is {human_bytes(report.dense_bytes_out)}"


def _export_gptq(
    src: str, out: str, bits: int, group_size: int, names: str, overwrite: bool, sym: bool
) -> None:
    from moe_local.convert.gptq_export import export_gptq, serving_notes
    from moe_local.progress import progress_bars

    with progress_bars() as bar:
        path = export_gptq(
            src, out, bits, group_size, sym=sym, names=names, overwrite=overwrite, progress=bar
        )
    kind = "symmetric" if sym else "asymmetric"
    typer.echo(f"wrote a GPTQ checkpoint (int{bits}, {kind}, groups of {group_size}) to {path}")
    for line in serving_notes(path, bits, group_size, sym):
        typer.echo(line)


@app.command(epilog="Example: moe-local plan ./mixtral-q4 --gpu rtx4090 --context 8192")
@with_load_flags(only=("cpu_memory", "context", "download"))  # it plans a load, without loading
def plan(
    model: ModelArg,
    gpu: Annotated[str, typer.Option(help="cpu, rtx4090, v100-16g or v100-32g")] = "cpu",
    gpu_memory: Annotated[str | None, typer.Option(help="device memory to use, e.g. 22GiB")] = None,
    *,
    flags: LoadFlags,
) -> None:
    """Show where the dense part, KV cache and experts would go, and the decode speed to expect."""
    from rich.console import Console
    from rich.table import Table

    from moe_local.planner import plan_for
    from moe_local.units import human_bytes, parse_size

    if flags.download:  # the planner reads the files, and never fetches them
        from moe_local.convert.staging import prepare

        model = str(prepare(model, None, download=True))
    p, info = plan_for(
        model,
        gpu=gpu,
        gpu_memory=parse_size(gpu_memory),
        cpu_memory=parse_size(flags.cpu_memory),
        context=flags.context,
    )
    fast = "GPU" if gpu != "cpu" else "RAM (fast tier)"
    table = Table(title=f"{info.path.name} on {gpu} ({p.dtype})", show_header=True)
    for col in ("what", "where", "size"):
        table.add_column(col)
    table.add_row("dense part", fast, human_bytes(p.dense_bytes))
    if p.embedding_on_disk:
        table.add_row(
            "input embedding table", "disk (rows read per lookup)", human_bytes(info.embedding_bytes)
        )
    if p.load_transient:
        table.add_row("held twice while loading", f"{fast}, before experts", human_bytes(p.load_transient))
    table.add_row(f"KV cache ({p.context} tokens)", fast, human_bytes(p.kv_bytes))
    table.add_row("runtime (measured on cpu)" if gpu == "cpu" else "runtime", fast, human_bytes(p.overhead))
    if p.reads_in_flight:
        label = "expert reads in flight" if p.prefetch else "expert read in flight (no room to prefetch: off)"
        table.add_row(label, fast, human_bytes(p.reads_in_flight))
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


@app.command(
    name="eval", epilog="Example: moe-local eval ./mixtral-q4 ./mixtral-q3 --text valid.txt --max-tokens 8192"
)
@with_load_flags(omit=("context",))  # its --context is the window, and the load context
def eval_(
    models: Annotated[list[str], typer.Argument(help="one or more model folders")],
    text: Annotated[str, typer.Option(help="plain-text file to score")],
    context: Annotated[
        int, typer.Option(help="window length; windows do not overlap (stride = context)")
    ] = 512,
    max_tokens: Annotated[int | None, typer.Option(help="score at most this many tokens")] = None,
    score: Annotated[
        str,
        typer.Option(
            help="all: every token of a window but its first; second-half: only the tokens after "
            "the window's middle, full windows only (what llama-perplexity -c CONTEXT scores)"
        ),
    ] = "all",
    *,
    flags: LoadFlags,
) -> None:
    """Perplexity (and tokens/s) of one model, or a comparison table of several, on a text file."""
    from rich.console import Console
    from rich.table import Table

    from moe_local.evaluate import check_score, perplexity, read_text_file
    from moe_local.loading.loader import load

    _setup_torch()
    check_score(score)
    corpus = read_text_file(text)  # before any model loads: a wrong path should not cost a load
    if max_tokens is not None and max_tokens < 2:
        raise MoeLocalError(f"--max-tokens must be at least 2 (a token scores the next), not {max_tokens}")
    if context < 2:
        raise MoeLocalError("--context must be at least 2")
    results = []
    for model in models:
        target = prepare_load(flags, model, context=context)
        lm = load(target.path, target.options)
        results.append(perplexity(lm, corpus, context=context, max_tokens=max_tokens, score=score))
        del lm
    if len(results) == 1:
        r = results[0]
        typer.echo(f"perplexity: {r.perplexity:.4f}")
        half = ", second half of each" if r.score == "second-half" else ""
        typer.echo(f"tokens: {r.tokens} in windows of {r.context}{half}, {r.tokens_per_s:.1f} tokens/s")
        return
    half = ", second half of each" if score == "second-half" else ""
    table = Table(title=f"perplexity on {text} (windows of {results[0].context}{half})")
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

    from moe_local.progress import progress_bars
    from moe_local.recipes import load_recipe
    from moe_local.synth import synth as run_synth
    from moe_local.units import human_bytes

    rec = load_recipe(recipe)
    t0 = time.perf_counter()
    with progress_bars() as bar:
        path = run_synth(like, out, layers=layers, recipe=rec, fmt=format, overwrite=overwrite, progress=bar)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    seconds = time.perf_counter() - t0
    typer.echo(f"wrote {human_bytes(size)} to {path} in {seconds:.1f} s ({size / seconds / 1e6:.0f} MB/s)")


@app.command(epilog="Example: moe-local bench ./mixtral-shaped --cpu-memory 8GiB --json run.json")
@with_load_flags(omit=("context",))  # the context is the prompt and the new tokens
def bench(
    model: ModelArg,
    prompt_tokens: Annotated[int, typer.Option(help="prompt length")] = 512,
    new_tokens: Annotated[int, typer.Option(help="tokens to decode")] = 128,
    json_file: Annotated[str | None, typer.Option("--json", help="also write the results as JSON")] = None,
    *,
    flags: LoadFlags,
) -> None:
    """Measure prefill and decode speed, expert traffic and the floor they are bounded by."""
    import dataclasses
    import json

    from moe_local.bench import bench as run_bench
    from moe_local.bench import format_table
    from moe_local.units import parse_size

    _setup_torch()
    if json_file:
        from moe_local.convert.outdir import check_output_file

        check_output_file(json_file, "--json")  # before the benchmark, not after it
    if new_tokens < 2:  # bench() says so too, but only after the plan and the staging
        raise MoeLocalError("--new-tokens must be at least 2")
    if prompt_tokens < 1:
        raise MoeLocalError("--prompt-tokens must be at least 1")
    target = prepare_load(flags, model, context=prompt_tokens + new_tokens + 1)
    result = run_bench(
        target.path,
        target.options,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        cpu_memory=parse_size(flags.cpu_memory),
    )
    typer.echo(format_table(result))
    if json_file:
        Path(json_file).write_text(json.dumps(dataclasses.asdict(result), indent=1))
