"""Progress when standard error is not a terminal: a line with percent, rate and ETA every few seconds."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import textwrap

import pytest

from moe_local.errors import MoeLocalError
from moe_local.progress import ProgressLines, line_interval, progress_bars


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_interval_with_percent_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines(10.0, out, clock)
    for step in range(1, 61):  # 60 steps, 1 s and 2 MB each
        clock.now += 1.0
        lines("layer 0", step, 60, 2_000_000)
    lines.close()
    written = out.getvalue().splitlines()
    assert len(written) == 6  # at 10, 20, ..., 60 s: the last one is the finished state
    assert written[0] == "layer 0: 17% (10/60), 2.0 MB/s, ETA 50s"
    assert written[2] == "layer 0: 50% (30/60), 2.0 MB/s, ETA 30s"
    assert written[-1] == "layer 0: 100% (60/60), 2.0 MB/s, done in 1m00s"


def test_steps_per_second_without_bytes_and_a_final_line():
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines(10.0, out, clock)
    lines("fit", 0, 400)
    assert out.getvalue() == ""  # nothing before the interval
    clock.now += 4.0
    lines("fit", 2, 400)
    lines.close()  # the block ended early: its last state is still shown
    assert out.getvalue() == "fit: 0% (2/400), 0.50/s, ETA 13m16s\n"
    lines.close()
    assert out.getvalue().count("\n") == 1  # not twice


def test_stages_each_time_their_own_eta():
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines(5.0, out, clock)
    for stage in ("dense", "layer 0"):
        for step in range(1, 4):
            clock.now += 2.0
            lines(stage, step, 3)
    lines.close()
    assert out.getvalue().splitlines() == [  # a stage's work began with the previous call
        "dense: 100% (3/3), 0.50/s, done in 6s",
        "layer 0: 100% (3/3), 0.50/s, done in 6s",
    ]


def test_lines_reach_the_log(caplog):
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines(1.0, out, clock)
    with caplog.at_level(logging.INFO, logger="moe_local.progress"):
        clock.now += 2.0
        lines("layer 1", 1, 2)
    assert [r.getMessage() for r in caplog.records] == ["layer 1: 50% (1/2), 0.50/s, ETA 2s"]


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOE_LOCAL_PROGRESS_SECONDS", "2.5")
    assert line_interval() == 2.5
    monkeypatch.delenv("MOE_LOCAL_PROGRESS_SECONDS")
    assert line_interval() == 10.0
    for bad in ("0", "-1", "soon", "inf", "nan"):
        monkeypatch.setenv("MOE_LOCAL_PROGRESS_SECONDS", bad)
        with pytest.raises(MoeLocalError, match="MOE_LOCAL_PROGRESS_SECONDS"):
            line_interval()


def test_progress_bars_choose_lines_off_a_terminal(monkeypatch, capsys):
    monkeypatch.setenv("MOE_LOCAL_PROGRESS_SECONDS", "1000")
    with progress_bars() as bar:  # pytest's captured stderr is not a terminal
        assert isinstance(bar, ProgressLines)
        bar("quantize", 3, 3, 10)
    assert re.fullmatch(r"quantize: 100% \(3/3\), [\d.]+ MB/s, done in 0s\n", capsys.readouterr().err)
    with progress_bars(plain=False) as bar:
        assert not isinstance(bar, ProgressLines)
        bar("quantize", 1, 2)


def test_a_redirected_process_prints_lines(tmp_path):
    """A real process with stderr in a file (as under systemd or CI) writes the lines there."""
    script = textwrap.dedent(
        """
        import time
        from moe_local.progress import progress_bars
        with progress_bars() as bar:
            for step in range(1, 6):
                time.sleep(0.06)
                bar("build", step, 5)
        """
    )
    log_file = tmp_path / "build.log"
    env = {"MOE_LOCAL_PROGRESS_SECONDS": "0.05", "PATH": "/usr/bin:/bin"}
    with log_file.open("w") as err:
        subprocess.run([sys.executable, "-c", script], stderr=err, env=env, check=True, timeout=120)
    written = log_file.read_text().splitlines()
    assert len(written) >= 4 and written[-1].startswith("build: 100% (5/5)")
    assert all(re.match(r"build: \d+% \(\d/5\), [\d.]+/s, (ETA|done in) \d+s$", w) for w in written), written
