"""Commands that get models onto this machine and show them: ``pull`` and ``list``."""

from __future__ import annotations

from typing import Annotated

import typer

from moe_local.cli.app import app


@app.command(epilog="Example: moe-local pull Qwen/Qwen1.5-MoE-A2.7B --revision main")
def pull(
    hub_id: Annotated[str, typer.Argument(help="the model's hub id, owner/name")],
    revision: Annotated[str | None, typer.Option(help="branch, tag or commit (default: main)")] = None,
) -> None:
    """Download a model into the Hugging Face cache: safetensors, configs and tokenizer, never pickles.

    The only command that uses the network. Run it again after an interruption: the files it
    finished stay in the cache and are not fetched again, and the file it was fetching goes on
    from the bytes it had (an HTTP Range request), checked against the hub's checksum.
    """
    from moe_local.hub import pull as run_pull
    from moe_local.progress import progress_bars
    from moe_local.units import human_bytes

    with progress_bars() as bar:
        result = run_pull(hub_id, revision=revision, progress=bar)
    cached = result.files - result.downloaded
    typer.echo(
        f"{result.repo_id} (commit {result.commit[:12]}): fetched {result.downloaded} files, "
        f"{human_bytes(result.nbytes)}" + (f"; {cached} already cached" if cached else "")
    )
    typer.echo(f"in {result.path}; run it with: moe-local chat {result.repo_id}")


@app.command(name="list", epilog="Example: moe-local list --json")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="print the list as JSON")] = False,
) -> None:
    """Show the models on this machine: the Hugging Face cache and moe-local folders (MOE_LOCAL_HOME)."""
    import json

    from moe_local.hub import list_models
    from moe_local.units import human_bytes

    models = list_models()
    if as_json:
        rows = [
            {
                "name": m.name,
                "where": m.where,
                "path": str(m.path),
                "family": m.family,
                "bytes": m.nbytes,
                "quantization": m.quantization,
            }
            for m in models
        ]
        typer.echo(json.dumps(rows, indent=1))
        return
    if not models:
        typer.echo("no models yet: moe-local pull OWNER/NAME fetches one; moe-local chat builds the demo")
        return
    header = ("NAME", "WHERE", "FAMILY", "SIZE", "QUANTIZATION")
    table = [header, *((m.name, m.where, m.family, human_bytes(m.nbytes), m.quantization) for m in models)]
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
