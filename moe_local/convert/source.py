"""The source of a conversion: a Hugging Face checkpoint opened with ``open_checkpoint``.

Quantizing and exporting read the checkpoint's own dtypes (experts uncast, the meta model in
float32 only for shapes) and evict what they read from the page cache, so converting a model
larger than RAM never fills it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe_local.errors import MoeLocalError
from moe_local.loading.checkpoint import HF, Checkpoint, checkpoint_kind, open_checkpoint


def open_source(path: Path, what: str) -> Checkpoint:
    """Open SRC for ``what`` ("quantize" or "export"): an original (unquantized) checkpoint.

    Raises:
        MoeLocalError: SRC is already quantized (a moe-local folder or a GPTQ checkpoint), or unreadable.
    """
    if checkpoint_kind(path) != HF:
        verb = "export from" if what == "export" else "quantize"
        raise MoeLocalError(f"{path} is already quantized; {verb} the original checkpoint")
    return open_checkpoint(path, dtype=torch.float32, expert_dtype=None, drop_cache=True)
