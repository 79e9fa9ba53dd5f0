"""``inspect``: what a checkpoint is, read from its config and tensor headers (no weights loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moe_local.format.gptq_reader import GptqExperts
from moe_local.format.manifest import DENSE_FILE
from moe_local.format.safetensors_io import SafetensorsFile
from moe_local.loading.checkpoint import GPTQ, checkpoint_kind, open_checkpoint
from moe_local.loading.disk_embedding import find_table
from moe_local.loading.families import IN_MEMORY_EXPERTS, TESTED_FAMILIES, family_state
from moe_local.loading.resolve import resolve_model_path


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
    dtypes: tuple[str, ...]  # tensor dtypes, or quantization schemes of a moe-local folder
    status: str  # "tested", "untested family (standard experts interface)" or "dense (no experts)"
    one_expert_bytes: int = 0  # the largest expert, as stored
    quantized: bool = False
    config: object = None  # the transformers config
    embedding_bytes: int = 0  # an input table a budgeted load leaves on disk (disk_embedding), as stored


def inspect_model(model: str | Path, *, download: bool = False) -> ModelInfo:
    """Describe a checkpoint: family, layers, experts, top-k, parameters and bytes.

    Args:
        model: a checkpoint folder or a cached hub id.
        download: allow fetching a hub id that is not cached.

    Returns:
        The description.

    Raises:
        MoeLocalError: the folder is not a checkpoint, its config is wrong, or its family is
            unsupported (says why).
    """
    path = resolve_model_path(model, download=download)
    kind = checkpoint_kind(path)
    # GPTQ's unquantized expert parts count at fp16; parameters are the same in any dtype
    ckpt = open_checkpoint(path, dtype=torch.float16 if kind == GPTQ else torch.float32, expert_dtype=None)
    config, meta, sites, manifest, files = ckpt.config, ckpt.meta, ckpt.sites, ckpt.manifest, ckpt.files
    quantized = manifest is not None and (manifest.get("staged") or {}).get("source") != "unquantized"
    # parameters come from the model definition, identical for a checkpoint and its quantized folder
    expert_names = {f"{s.name}.{n}" for s in sites for n, _ in meta.get_submodule(s.name).named_parameters()}
    params = dict(meta.named_parameters())
    expert_params = sum(params[n].numel() for n in expert_names if n in params)
    total_params = sum(p.numel() for p in params.values())
    per_expert = {
        s.layer: sum(
            params[f"{s.name}.{n}"].numel() for n, _ in meta.get_submodule(s.name).named_parameters()
        )
        // s.num_experts
        for s in sites
    }
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    active = total_params - expert_params + sum(top_k * n for n in per_expert.values())
    if manifest is not None:
        dense_file = SafetensorsFile(path / DENSE_FILE)
        dense_bytes = sum(t.nbytes for t in dense_file.tensors.values())
        per_layer = {int(k): v for k, v in manifest["layers"].items()}
        expert_bytes = sum(length for v in per_layer.values() for _, length, _ in v["experts"])
        one_expert = max((v["experts"][0][1] for v in per_layer.values()), default=0)
        schemes = {s for s in manifest["dense"].values()} | {
            s for v in per_layer.values() for s in v["schemes"].values()
        }
        dtypes = tuple(sorted(schemes))
    else:
        experts = ckpt.experts
        claimed = {k for k in experts.claimed if k in files.key_to_file}
        expert_bytes = sum(files.info(k).nbytes for k in claimed)
        dense_bytes = sum(files.info(k).nbytes for k in files.names()) - expert_bytes
        one_expert = max((experts.expert_nbytes(s.layer) for s in sites), default=0)
        dtypes = tuple(sorted({str(files.info(k).dtype).removeprefix("torch.") for k in files.names()}))
        if getattr(files, "method", None):  # published quantized (fp8, mxfp4): read as the dtypes above
            dtypes = (*dtypes, f"stored {files.method}")
        if kind == GPTQ:
            dtypes = (f"gptq int{experts.config.bits}",) if isinstance(experts, GptqExperts) else ("gptq",)
    state = family_state(config.model_type)
    if not sites and config.model_type in IN_MEMORY_EXPERTS:
        status = f"supported ({state})"  # the state says why its experts stay in memory
    elif not sites:
        status = "dense (no experts): runs with every weight resident"
    elif config.model_type in TESTED_FAMILIES:
        status = "supported (tested family)"
    elif state.startswith("exact"):
        status = f"supported (verified: {state})"
    else:
        status = "supported (untested family with the standard experts interface)"
    return ModelInfo(
        path=path,
        family=config.model_type,
        architecture=type(meta).__name__,
        layers=_layer_count(config),
        moe_layers=len(sites),
        experts_per_layer=max((s.num_experts for s in sites), default=0),
        top_k=top_k,
        total_params=total_params,
        active_params=active,
        dense_bytes=dense_bytes,
        expert_bytes=expert_bytes,
        dtypes=dtypes,
        status=status,
        one_expert_bytes=one_expert,
        quantized=quantized,
        config=config,
        embedding_bytes=table.nbytes if (table := find_table(ckpt)) is not None else 0,
    )


def _layer_count(config) -> int:
    """Transformer blocks: an encoder-decoder's decoder blocks count too."""
    layers = int(getattr(config, "num_hidden_layers", 0))
    if getattr(config, "is_encoder_decoder", False):
        layers += int(getattr(config, "num_decoder_layers", 0) or 0)
    return layers
