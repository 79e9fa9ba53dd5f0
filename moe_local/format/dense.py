"""Read the dense (non-expert) weights of a Hugging Face checkpoint into a model built on meta."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moe_local.errors import CheckpointError
from moe_local.format.safetensors_io import CheckpointFiles

Progress = Callable[[str, int, int], None]


def read_dense_tensor(files: CheckpointFiles, key: str, target: torch.Tensor, dtype) -> torch.Tensor:
    """Read checkpoint tensor ``key`` for the (meta) parameter ``target``: shape checked, floats cast.

    Raises:
        CheckpointError: the shape differs from what the config implies.
    """
    return checked_dense(key, files.read(key), target, dtype)


def checked_dense(key: str, t: torch.Tensor, target: torch.Tensor, dtype) -> torch.Tensor:
    """``t`` (from checkpoint ``key``) for the (meta) parameter ``target``: shape checked, floats cast.

    Raises:
        CheckpointError: the shape differs from what the config implies.
    """
    if tuple(t.shape) != tuple(target.shape):
        raise CheckpointError(f"{key} has shape {tuple(t.shape)}; the config implies {tuple(target.shape)}")
    if target.is_floating_point() and not t.is_floating_point():
        raise CheckpointError(f"{key} is stored as {t.dtype}; a weight of this model must be floating point")
    if t.is_floating_point() and target.is_floating_point():
        t = t.to(target.dtype if target.dtype.is_floating_point else dtype)
    return t


def linear_named(lm: nn.Module, name: str) -> nn.Linear | None:
    """The ``nn.Linear`` called ``name`` in ``lm``, or None (absent, or another kind of module)."""
    try:
        module = lm.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


def embedding_named(lm: nn.Module, name: str) -> nn.Embedding | None:
    """The plain ``nn.Embedding`` called ``name`` in ``lm``, or None (absent, or a subclass)."""
    try:
        module = lm.get_submodule(name)
    except AttributeError:
        return None
    return module if type(module) is nn.Embedding else None


def load_hf_dense(
    lm: nn.Module,
    files: CheckpointFiles,
    renamed: dict[str, str],
    claimed: set[str],
    dtype: torch.dtype,
    progress: Progress | None = None,
    converted: dict | None = None,
) -> int:
    """Read every non-expert weight into the meta model; return their bytes.

    Args:
        lm: the model, parameters on meta.
        files: the checkpoint's safetensors files.
        renamed: in-memory name -> checkpoint key, for every checkpoint key.
        claimed: checkpoint keys that hold experts (left to the expert source).
        dtype: compute dtype for float tensors.
        progress: called as ``progress("dense weights", done, total)``.
        converted: weights transformers merges or splits from checkpoint tensors
            (``moe_local.loading.families.DenseConversion`` by first in-memory name).
    """
    wanted = lm.state_dict(keep_vars=True)
    dense = {name: key for name, key in renamed.items() if key not in claimed and name in wanted}
    total, state = 0, {}
    for i, (name, key) in enumerate(dense.items()):
        t = read_dense_tensor(files, key, wanted[name], dtype)
        state[name] = t
        total += t.numel() * t.element_size()
        if progress:
            progress("dense weights", i + 1, len(dense))
    for name, conversion in (converted or {}).items():
        made = conversion.convert(name, files.read, lm)
        for target_name, t in made.items():
            if target_name not in wanted:
                raise CheckpointError(
                    f"{conversion.sources[0][1]} converts to {target_name}, which the model lacks"
                )
            t = checked_dense(conversion.sources[0][1], t, wanted[target_name], dtype)
            state[target_name] = t
            total += t.numel() * t.element_size()
    lm.load_state_dict(state, strict=False, assign=True)
    return total
