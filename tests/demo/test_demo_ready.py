"""The quantized demo, on a 2-layer slice: ``ensure_demo``, ``moe-local demo`` and the default MODEL."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from moe_local.config import LoadOptions, SamplingParams
from tests.helpers import run_cli

LAYERS = 2


@pytest.fixture(scope="module")
def home(tmp_path_factory, downloads) -> Path:
    home = tmp_path_factory.mktemp("demo-ready-home")
    (home / "downloads").symlink_to(downloads, target_is_directory=True)
    return home


@pytest.fixture(scope="module")
def ready(home) -> Path:
    from moe_local.demo import ensure_demo

    stages: list[str] = []
    path = ensure_demo(home, layers=LAYERS, progress=lambda stage, *rest: stages.append(stage))
    assert "fitting routers" in stages and "experts" in " ".join(stages)
    return path


def test_ensure_demo_writes_a_quantized_moe_local_folder(ready, home):
    from moe_local.demo import DemoConfig, demo_dir

    manifest = json.loads((ready / "moe_local.json").read_text())
    record = json.loads((ready / "demo.json").read_text())
    assert record["recipe"] == "experts-4bit" and record["config"]["layers"] == LAYERS
    assert len(manifest["layers"]) == LAYERS
    assert all(len(layer["experts"]) == 8 for layer in manifest["layers"].values())
    assert manifest["layers"]["0"]["schemes"] == {"gate_up": "int4-g64-hqq", "down": "int4-g64-hqq"}
    assert "Apache" in (ready / "LICENSE").read_text()
    # the bf16 source is gone; only the quantized folder stays
    assert not (demo_dir(home) / DemoConfig(layers=LAYERS).folder_name()).exists()
    bf16_experts = LAYERS * 8 * 3 * 576 * 1536 * 2
    blobs = sum(e[1] for layer in manifest["layers"].values() for e in layer["experts"])
    assert blobs < 0.3 * bf16_experts  # 4 bits plus fp16 scale and zero per 64 weights: 0.28


def test_second_call_returns_at_once(ready, home):
    from moe_local.demo import ensure_demo

    t0 = time.perf_counter()
    assert ensure_demo(home, layers=LAYERS) == ready
    assert time.perf_counter() - t0 < 0.5


def test_quantized_demo_stays_close_to_the_bf16_build(ready, home, downloads):
    import moe_local
    from moe_local.demo import build_demo

    source = build_demo(home, layers=LAYERS, downloads=downloads)  # rebuilt for the comparison
    ids = torch.randint(100, 40000, (1, 96), generator=torch.Generator().manual_seed(0))
    ref = moe_local.load(source, LoadOptions(dtype="float32")).model(input_ids=ids).logits
    got = moe_local.load(ready, LoadOptions(dtype="float32")).model(input_ids=ids).logits
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.99, cos  # 4-bit experts, 8-bit attention


def test_demo_command_prints_the_folder(ready, home, capsys, monkeypatch):
    monkeypatch.setenv("MOE_LOCAL_HOME", str(home))
    code, out, err = run_cli(capsys, "demo", "--layers", str(LAYERS))
    assert code == 0, err
    assert out.strip() == str(ready)


def test_generate_without_model_uses_the_demo(ready, home, capsys, monkeypatch):
    import moe_local.demo

    real = moe_local.demo.ensure_demo
    monkeypatch.setattr(moe_local.demo, "ensure_demo", lambda **kw: real(home, layers=LAYERS, **kw))
    code, out, err = run_cli(capsys, "generate", "What is the capital of France?", "-n", "4")
    assert code == 0, err
    assert "built-in demo" in err and str(ready) in err
    assert out.strip()


def test_demo_slice_generates(ready):
    import moe_local

    lm = moe_local.load(ready)
    out = moe_local.generate(lm, "Hello", SamplingParams(max_tokens=4))
    assert out.stats.generation_tokens >= 1


def test_chat_without_model_uses_the_demo(ready, home, capsys, monkeypatch):
    import io

    import moe_local.demo

    real = moe_local.demo.ensure_demo
    monkeypatch.setattr(moe_local.demo, "ensure_demo", lambda **kw: real(home, layers=LAYERS, **kw))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
    code, out, err = run_cli(capsys, "chat", "-n", "4", "--temperature", "0")
    assert code == 0, err
    assert "built-in demo" in err and str(ready) in err
    assert out.strip()
