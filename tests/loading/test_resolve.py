"""MODEL resolution: folders, and hub ids found in the local Hugging Face cache without a network."""

from __future__ import annotations

import shutil

import pytest

from moe_local.errors import MoeLocalError
from moe_local.loading.resolve import resolve_model_path


def test_folder(tiny_mixtral):
    assert resolve_model_path(str(tiny_mixtral)) == tiny_mixtral


def test_hub_id_from_local_cache(tiny_mixtral, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-moe" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_mixtral, snap)
    (cache / "models--acme--tiny-moe" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-moe" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    assert resolve_model_path("acme/tiny-moe") == snap
    with pytest.raises(MoeLocalError, match="--download"):
        resolve_model_path("acme/not-cached")


def test_file_is_not_a_model(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(MoeLocalError, match="is a file"):
        resolve_model_path(tmp_path / "f.txt")
