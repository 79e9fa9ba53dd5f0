"""Test helpers: run the CLI in-process and capture its one-line errors."""

from __future__ import annotations

import sys

import pytest

from moe_local.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``moe-local ARGS`` in this process; return (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["moe-local", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """The CLI failed with a non-zero exit and a single ``error:`` line naming the problem."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code != 0
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


__all__ = ["assert_one_line_error", "pytest", "run_cli"]
