"""Resuming ``quantize``: what a run was started with, and whether a partial folder may continue.

A work folder ``OUT.partial`` records its run (``progress/run.json``: the source identified by
content, the recipe's rules, the calibration options, the format version); ``--resume`` continues
only a run started with the same, and a fresh start replaces only a work folder of ours.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moe_local.convert.outdir import check_partial, clear_partial, make_partial
from moe_local.errors import MoeLocalError
from moe_local.format.manifest import FORMAT_VERSION, write_json_atomic
from moe_local.format.safetensors_io import CheckpointFiles
from moe_local.recipes import Recipe


def run_record(
    src: Path,
    files: CheckpointFiles,
    recipe: Recipe,
    calibration,
    tokens: int,
    min_tokens: int,
    imatrix=False,
    act_order=False,
):
    """What a run was started with: a resume must match it field by field.

    The source is identified by content, not by path (a moved folder is the same source): its
    index (or tensor names), config.json, and each shard's size and sampled bytes (a fine-tune
    of the same base has the same index and sizes, but differs at almost every byte).
    """
    index = src / "model.safetensors.index.json"
    ident = index.read_bytes() if index.exists() else "\n".join(sorted(files.names())).encode()
    shards = {name: [f.size, _sample_digest(f.path, f.size)] for name, f in sorted(files.files.items())}
    config = hashlib.sha256((src / "config.json").read_bytes()).hexdigest()
    rules = [[r.pattern, r.label] for r in recipe.rules]
    cal = None
    if calibration is not None and Path(calibration).is_file():
        cal = hashlib.sha256(Path(calibration).read_bytes()).hexdigest()
    options = {"calibration_sha256": cal, "calibration_tokens": tokens, "min_expert_tokens": min_tokens}
    if imatrix:  # recorded only when on: a run without it keeps the record it always had
        options["imatrix"] = True
    if act_order:
        options["act_order"] = True
    return {
        "source": {
            "index_sha256": hashlib.sha256(ident).hexdigest(),
            "shards": shards,
            "config_sha256": config,
        },
        "recipe": {"name": recipe.name, "rules": rules},
        "options": options,
        "format_version": FORMAT_VERSION,
    }


def _sample_digest(path: Path, size: int, samples: int = 16, span: int = 4096) -> str:
    """SHA-256 of ``samples`` evenly spaced ``span``-byte pieces of a file (and its last piece)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in sorted({size * i // samples for i in range(samples)} | {max(size - span, 0)}):
            f.seek(offset)
            h.update(f.read(span))
    return h.hexdigest()


_WHAT_DIFFERS = {
    "source": "a different SRC (its index, config.json or weights differ)",
    "recipe": "a different recipe or --method (or --bits, --group-size)",
    "options": "different calibration options (--calibration file, token counts, --imatrix or --act-order)",
    "format_version": "another version of moe-local",
}


def check_start(partial: Path, overwrite: bool, resume: bool, run: dict) -> None:
    """Refuse, before any work, a start that would lose data or a resume that would mix two runs.

    OUT itself was checked by ``check_output`` when the run began.
    """
    record = partial / "progress" / "run.json"
    if resume:
        if not partial.is_dir():
            raise MoeLocalError(f"nothing to resume: {partial} does not exist")
        try:
            started = json.loads(record.read_text())
        except (OSError, ValueError) as exc:
            raise MoeLocalError(
                f"cannot resume {partial}: it does not record what it was started with; "
                "start over with --overwrite"
            ) from exc
        differs = [_WHAT_DIFFERS[k] for k in _WHAT_DIFFERS if started.get(k) != run[k]]
        if differs:
            raise MoeLocalError(
                f"cannot resume {partial}: it was started with " + " and ".join(differs) + "; "
                "rerun with the same SRC and options, or start over with --overwrite"
            )
        return
    if partial.exists() and not overwrite:
        raise MoeLocalError(f"{partial} holds an unfinished run; pass --resume to continue it or --overwrite")
    check_partial(partial)


def start_partial(partial: Path, run: dict) -> None:
    """A fresh work folder (an earlier one of ours replaced) that records what the run is."""
    record = partial / "progress" / "run.json"
    clear_partial(partial)
    make_partial(partial, "quantize")
    (partial / "experts").mkdir(exist_ok=True)
    (partial / "progress").mkdir(exist_ok=True)
    write_json_atomic(record, run)
