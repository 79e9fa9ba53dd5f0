"""``inspect``: what a checkpoint is, read from its config and tensor headers (no weights loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moe_local.errors import UnsupportedModelError
from moe_local.loading.families import (
    TESTED_FAMILIES,
    CheckpointExperts,
    checkpoint_renamer,
    find_expert_sites,
)
from moe_local.loading.loader import load_config
from moe_local.loading.meta import build_on_meta
from moe_local.loading.resolve import resolve_model_path
from moe_local.loading.safetensors_io import CheckpointFiles


@dataclass(frozen=True)
class ModelInfo:
    """A checkpoint's shape and sizes."""

    path: Path
    family: str
    architecture: str
    layers: int
    moe_layers: int
    experts_per_layer: int
    top_k: int
    total_params: int
    active_params: int
    dense_bytes: int
    expert_bytes: int
    dtypes: tuple[str, ...]
    status: str  # "tested", "untested family (standard experts interface)" or "dense (no experts)"


def inspect_model(model: str | Path, *, download: bool = False) -> ModelInfo:
    """Describe a checkpoint: family, layers, experts, top-k, parameters and bytes.

    Args:
        model: a checkpoint folder or a cached hub id.
        download: allow fetching a hub id that is not cached.

    Returns:
        The description.

    Raises:
        MoeLocalError: the folder is not a checkpoint, or its family is unsupported (says why).
    """
    path = resolve_model_path(model, download=download)
    config = load_config(path)
    files = CheckpointFiles(path)
    try:
        meta = build_on_meta(config, torch.float32)
    except Exception as exc:
        raise UnsupportedModelError(
            f"family {config.model_type!r} is not supported: transformers cannot build it as a causal LM "
            f"({str(exc).splitlines()[0]})"
        ) from exc
    sites = find_expert_sites(meta)
    rename = checkpoint_renamer(meta)
    renamed = {rename(k): k for k in files.names()}
    experts = CheckpointExperts(files, sites, renamed, None) if sites else None
    claimed = experts.claimed if experts else set()
    numel = {k: _numel(files.info(k).shape) for k in files.names()}
    expert_params = sum(numel[k] for k in claimed)
    total_params = sum(numel.values())
    per_expert = {s.layer: expert_params_of(experts, s.layer, numel) for s in sites} if experts else {}
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    active = total_params - expert_params + sum(top_k * n for n in per_expert.values())
    expert_bytes = sum(files.info(k).nbytes for k in claimed)
    dense_bytes = sum(files.info(k).nbytes for k in files.names()) - expert_bytes
    dtypes = tuple(sorted({str(files.info(k).dtype).removeprefix("torch.") for k in files.names()}))
    if not sites:
        status = "dense (no experts): runs with every weight resident"
    elif config.model_type in TESTED_FAMILIES:
        status = "supported (tested family)"
    else:
        status = "supported (untested family with the standard experts interface)"
    return ModelInfo(
        path=path,
        family=config.model_type,
        architecture=type(meta).__name__,
        layers=int(getattr(config, "num_hidden_layers", 0)),
        moe_layers=len(sites),
        experts_per_layer=max((s.num_experts for s in sites), default=0),
        top_k=top_k,
        total_params=total_params,
        active_params=active,
        dense_bytes=dense_bytes,
        expert_bytes=expert_bytes,
        dtypes=dtypes,
        status=status,
    )


def expert_params_of(experts: CheckpointExperts, layer: int, numel: dict[str, int]) -> int:
    """Parameters of one expert of ``layer``."""
    keys = experts.keys[layer]
    if keys.fused:
        return sum(numel[k] // experts.files.info(k).shape[0] for k in keys.fused.values())
    return sum(numel[k] for k in next(iter(keys.per_expert.values())).values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def human_bytes(n: float) -> str:
    """Format bytes with binary units: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    """Format a parameter count: ``46.7B``, ``12.9M``."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))
