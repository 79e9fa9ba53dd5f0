"""Quantizing streams a layer at a time: peak RSS stays near two layers of source weights."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from moe_local.tiny import make_tiny_checkpoint

SCRIPT = textwrap.dedent(
    """
    import json, sys, psutil, torch
    torch.set_num_threads(1)
    from moe_local.convert.writer import quantize_checkpoint
    from moe_local.loading.checkpoint import load_config
    from moe_local.loading.meta import build_on_meta
    from moe_local.quant import quantize, QType
    from moe_local.recipes import load_recipe
    from pathlib import Path
    src, out, recipe = sys.argv[1], sys.argv[2], sys.argv[3]
    build_on_meta(load_config(Path(src)), torch.float32)  # one-time library allocations
    quantize(torch.randn(64, 256), QType(8, 128))
    base = psutil.Process().memory_info().rss
    quantize_checkpoint(src, out, load_recipe(recipe))
    status = open("/proc/self/status").read()
    peak = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
    print(json.dumps({"base": base, "peak": peak}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_quantize_peak_rss_is_about_two_layers(tmp_path):
    # 4 layers x 8 experts x (3 x 256 x 2048) fp32: 50 MiB of experts per layer, 201 MiB in all
    src = make_tiny_checkpoint(
        "mixtral",
        tmp_path / "wide",
        hidden_size=256,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_local_experts=8,
    )
    recipe = tmp_path / "int8.toml"
    recipe.write_text('[[rule]]\nmatch = "*.experts.*"\nscheme = "int8-g128"\n')
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(src), str(tmp_path / "q"), str(recipe)],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    layer = 8 * 3 * 256 * 2048 * 4
    grown = r["peak"] - r["base"]
    assert grown < 2 * layer + 32 * 2**20, r  # two layers of source weights + dense part and noise
    assert (tmp_path / "q" / "moe_local.json").exists()
