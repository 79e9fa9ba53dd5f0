"""``moe-local convert``: checkpoints published outside Hugging Face's format, made loadable.

``convert grok1 CKPT OUT``: xAI's JAX release of Grok-1 (``ckpt-0``) to a safetensors checkpoint
of the family moe-local defines (``moe_local.convert.grok1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_local.cli.app import app

convert_app = typer.Typer(help="Convert checkpoints published in other formats.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@convert_app.command(
    epilog="Example: moe-local convert grok1 ./checkpoints/ckpt-0 ./grok-1 --tokenizer tokenizer.model"
)
def grok1(
    ckpt: Annotated[Path, typer.Argument(help="the release's ckpt-0 folder (tensorNNNNN_000 files)")],
    out: Annotated[Path, typer.Argument(help="the folder to create")],
    tokenizer: Annotated[
        Path | None, typer.Option(help="the release's tokenizer.model, copied beside the weights")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an OUT that moe-local wrote")] = False,
) -> None:
    """Convert xAI's Grok-1 release (pickled JAX arrays, read with a restricted unpickler) to safetensors."""
    from rich.progress import Progress

    from moe_local.convert.grok1 import convert_grok1

    with Progress(transient=True) as bar:
        task = bar.add_task("converting", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=stage)

        path = convert_grok1(ckpt, out, tokenizer=tokenizer, overwrite=overwrite, progress=progress)
    typer.echo(str(path))
