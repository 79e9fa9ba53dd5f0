"""moe-local: run large Mixture-of-Experts models on one GPU or a CPU, experts behind a cache.

Public API (imported lazily so ``moe-local --help`` stays fast)::

    import moe_local
    lm = moe_local.load("path/to/checkpoint")
    print(moe_local.generate(lm, "Hello").text)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_local._version import __version__

_LAZY = {
    "load": "moe_local.loading.loader",
    "LoadedModel": "moe_local.loading.loader",
    "LoadOptions": "moe_local.config",
    "SamplingParams": "moe_local.config",
    "generate": "moe_local.generation",
    "stream_generate": "moe_local.generation",
    "generate_step": "moe_local.generation",
    "GenerationResponse": "moe_local.generation",
    "make_sampler": "moe_local.sampling",
    "make_logits_processors": "moe_local.sampling",
    "inspect_model": "moe_local.inspection",
    "MoeLocalError": "moe_local.errors",
}

__all__ = [
    "GenerationResponse",
    "LoadOptions",
    "LoadedModel",
    "MoeLocalError",
    "SamplingParams",
    "__version__",
    "generate",
    "generate_step",
    "inspect_model",
    "load",
    "make_logits_processors",
    "make_sampler",
    "stream_generate",
]

if TYPE_CHECKING:
    from moe_local.config import LoadOptions, SamplingParams
    from moe_local.errors import MoeLocalError
    from moe_local.generation import GenerationResponse, generate, generate_step, stream_generate
    from moe_local.inspection import inspect_model
    from moe_local.loading.loader import LoadedModel, load
    from moe_local.sampling import make_logits_processors, make_sampler


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_local' has no attribute {name!r}")
