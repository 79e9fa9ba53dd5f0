"""Fixtures shared by the quantize tests that calibrate (GPTQ, importance-weighted rounding)."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "corpora" / "shakespeare"


@pytest.fixture
def calibration_text(tmp_path) -> Path:
    path = tmp_path / "cal.txt"
    if (CORPUS / "train.txt").exists():
        path.write_text((CORPUS / "train.txt").read_text()[:12000])
    else:  # outside the workplace: any varied text will do
        path.write_text(" ".join(f"line {i} of a calibration text about {i % 7} things." for i in range(800)))
    return path
