"""The CLI: fast help, generate streaming to stdout, inspect, python -m."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import run_cli


def test_help_imports_no_torch():
    code = "import sys, moe_local.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


def test_help_lists_commands_and_env(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert "generate" in out and "inspect" in out and "MOE_LOCAL_THREADS" in out


def test_generate_prints_stream_and_stats(capsys, tiny_mixtral):
    code, out, err = run_cli(
        capsys, "generate", str(tiny_mixtral), "Hello", "-n", "8", "--stats", "--no-chat"
    )
    assert code == 0
    assert out.endswith("\n") and len(out) > 1
    assert "generation: 8 tokens" in err and "hit rate" in err


def test_generate_budgeted_reports_misses(capsys, tiny_mixtral):
    args = ["generate", str(tiny_mixtral), "Hello", "-n", "4", "--stats", "--expert-memory", "32KiB"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0
    assert "misses" in err and " 0 misses" not in err


def test_inspect(capsys, tiny_mixtral):
    code, out, _ = run_cli(capsys, "inspect", str(tiny_mixtral))
    assert code == 0
    for needle in ("mixtral", "4 per layer, top-2", "2 with experts", "active per token", "float32"):
        assert needle in out


def test_inspect_numbers(tiny_mixtral):
    from moe_local.inspection import inspect_model

    info = inspect_model(tiny_mixtral)
    per_expert = 3 * 32 * 64
    assert info.expert_bytes == 2 * 4 * per_expert * 4
    assert info.active_params == info.total_params - 2 * 4 * per_expert + 2 * 2 * per_expert


def test_python_dash_m(tiny_mixtral):
    r = subprocess.run(
        [sys.executable, "-m", "moe_local", "generate", str(tiny_mixtral), "Hi", "-n", "3"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
