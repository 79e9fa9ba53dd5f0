"""Sparse upcycling: a dense Llama state dict -> a Mixtral checkpoint whose experts copy the FFN.

Every expert of a layer is the dense FFN. Expert e > 0 stores its intermediate units in its
own (seeded) order: rows of ``w1``/``w3`` and columns of ``w2`` permuted alike, which computes
the same function, so the MoE's output equals the dense model's up to float rounding whatever
the router picks (top-k weights sum to 1), yet no two experts hold the same tensors: mixing up
two experts' files, or a layer's ``w1`` with another expert's ``w2``, shows in the output, and
group-wise quantization sees different groups. An optional Gaussian ``noise`` (relative to each
weight row's RMS) makes the experts differ as functions too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

Progress = Callable[[str, int, int], None]
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SHARD_BYTES = 1 << 30


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a checkpoint dtype name ("bfloat16" or "float32").

    Args:
        name: the dtype's name.

    Returns:
        The torch dtype.

    Raises:
        MoeLocalError: any other name.
    """
    from moe_local.errors import MoeLocalError

    if name not in _DTYPES:
        raise MoeLocalError(f"demo dtype must be one of {', '.join(_DTYPES)}, not {name!r}")
    return _DTYPES[name]


def expert_permutation(layer: int, expert: int, size: int, seed: int) -> torch.Tensor | None:
    """The order expert ``expert`` of ``layer`` stores its intermediate units in (None: as is).

    Args:
        layer: layer index.
        expert: expert index (expert 0 keeps the dense order).
        size: intermediate units.
        seed: the build's seed.

    Returns:
        A permutation of ``range(size)``, or None for expert 0.
    """
    if expert == 0:
        return None
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer * 1009 + expert)
    return torch.randperm(size, generator=gen)


def mixtral_tensors(
    dense: dict[str, torch.Tensor],
    routers: list[torch.Tensor],
    *,
    experts: int,
    dtype: torch.dtype,
    permute: bool = True,
    noise: float = 0.0,
    seed: int = 0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the Mixtral checkpoint's tensors, named as transformers' ``save_pretrained`` names them.

    Args:
        dense: the Llama state dict (``model.layers.L.mlp.gate_proj.weight`` ...).
        routers: one ``(experts, hidden)`` router weight per layer.
        experts: experts per layer.
        dtype: the stored dtype.
        permute: store each expert's units in its own order (see the module docstring).
        noise: relative Gaussian perturbation of each expert copy (0: exact copies).
        seed: seeds the permutations and the noise.

    Yields:
        ``(name, tensor)`` pairs, layer by layer; no ``lm_head`` when embeddings are tied.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in dense.items():
        if ".layers." not in name:
            yield name, tensor.to(dtype)
    for layer, router in enumerate(routers):
        prefix = f"model.layers.{layer}"
        for name, tensor in dense.items():
            if name.startswith(f"{prefix}.") and ".mlp." not in name:
                yield name, tensor.to(dtype)
        yield f"{prefix}.block_sparse_moe.gate.weight", router.to(dtype)
        gate, up, down = (dense[f"{prefix}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
        for e in range(experts):
            perm = expert_permutation(layer, e, gate.shape[0], seed) if permute else None
            w1, w3, w2 = (gate, up, down) if perm is None else (gate[perm], up[perm], down[:, perm])
            for w, tensor in (("w1", w1), ("w2", w2), ("w3", w3)):
                if noise and e > 0:
                    rms = tensor.pow(2).mean(dim=1, keepdim=True).sqrt()
                    tensor = tensor + noise * rms * torch.randn(tensor.shape, generator=gen)
                yield f"{prefix}.block_sparse_moe.experts.{e}.{w}.weight", tensor.to(dtype).contiguous()


def write_safetensors(
    tensors: Iterator[tuple[str, torch.Tensor]],
    folder: Path,
    total: int,
    progress: Progress | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> int:
    """Write tensors as safetensors shards (one ``model.safetensors`` when they fit one shard).

    Args:
        tensors: ``(name, tensor)`` pairs.
        folder: the checkpoint folder.
        total: how many tensors ``tensors`` yields (for progress).
        progress: called as ``progress(stage, done, total)`` per tensor.
        shard_bytes: most bytes per shard.

    Returns:
        Bytes written (tensor data).
    """
    from moe_local.convert.outdir import save_safetensors

    parts: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = written = 0

    def flush() -> None:
        path = folder / f"part-{len(parts):05d}.safetensors"
        save_safetensors(shard, path, metadata={"format": "pt"})
        parts.append((path, list(shard)))
        shard.clear()

    for i, (name, tensor) in enumerate(tensors):
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
            size = 0
        if any(t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in shard.values()):
            tensor = tensor.clone()  # safetensors refuses shared storage (identical expert copies)
        shard[name] = tensor
        size += nbytes
        written += nbytes
        if progress:
            progress("writing experts", i + 1, total)
    flush()
    if len(parts) == 1:
        parts[0][0].rename(folder / "model.safetensors")
        return written
    weight_map = {}
    for i, (path, names) in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        path.rename(folder / fname)
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": written}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return written


def count_tensors(dense: dict[str, torch.Tensor], layers: int, experts: int) -> int:
    """How many tensors ``mixtral_tensors`` yields.

    Args:
        dense: the Llama state dict.
        layers: layers kept.
        experts: experts per layer.

    Returns:
        The count.
    """
    mlp = sum(1 for name in dense if ".mlp." in name)
    return len(dense) - mlp + layers * (1 + 3 * experts)
