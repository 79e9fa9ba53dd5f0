"""Shared fixtures: one tiny MoE checkpoint per family, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moe_local.tiny import FAMILIES, make_tiny_checkpoint

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _private_home(tmp_path_factory):
    """Keep measured bandwidths and caches out of the user's home."""
    os.environ["MOE_LOCAL_HOME"] = str(tmp_path_factory.mktemp("moe-local-home"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: ``tiny_checkpoint(family, **overrides) -> folder``, cached for the session."""
    made: dict[tuple, Path] = {}

    def make(family: str = "mixtral", **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            made[key] = make_tiny_checkpoint(family, folder, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_mixtral(tiny_checkpoint) -> Path:
    """The default tiny model: Mixtral-shaped, 2 layers, 4 experts, top-2."""
    return tiny_checkpoint("mixtral")


@pytest.fixture(scope="session")
def tiny_lm(tiny_mixtral):
    """The tiny Mixtral loaded with every expert in RAM."""
    from moe_local.loading.loader import load

    return load(tiny_mixtral)


ALL_FAMILIES = tuple(FAMILIES)
