"""Progress for long work (quantizing, building the demo): bars on a terminal, lines elsewhere.

Library functions report progress through a plain callback, ``progress(stage, done, total)``
(quantizing adds the input bytes of the step); ``progress_bars`` turns those calls into rich bars
with a rate and an ETA on a terminal. When standard error is not a terminal (a log file, CI,
systemd) a bar draws nothing until the end, so a line with the percent, rate and ETA is written
every ``MOE_LOCAL_PROGRESS_SECONDS`` seconds instead (and to the ``moe_local.progress`` logger).
Library code never imports rich.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from moe_local.env import PROGRESS_SECONDS
from moe_local.errors import MoeLocalError

Callback = Callable[..., None]
log = logging.getLogger("moe_local.progress")


def line_interval() -> float:
    """``MOE_LOCAL_PROGRESS_SECONDS`` as seconds.

    Raises:
        MoeLocalError: not a positive number.
    """
    text = PROGRESS_SECONDS.get().strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise MoeLocalError(f"{PROGRESS_SECONDS.name} must be a positive number of seconds, not {text!r}")
    return seconds


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressLines:
    """The progress callback that writes a plain line at most every ``interval`` seconds.

    Each line names the stage, its percent and count, the rate (MB/s of input when the caller
    reports bytes, else steps/s) and the ETA of the stage, e.g.
    ``layer 3: 42% (5/12), 12.3 MB/s, ETA 1m05s``.

    Args:
        interval: least seconds between two lines.
        stream: where lines go (default: standard error).
        clock: the time source, seconds.
    """

    def __init__(
        self, interval: float, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.stream = stream
        self.clock = clock
        self.start = clock()
        self.last_line = self.last_call = self.start
        self.bytes = 0
        self.stages: dict[str, float] = {}  # stage -> when its work began (the call before its first)
        self.state: tuple[str, int, int] | None = None
        self.written: tuple[str, int, int] | None = None

    def __call__(self, stage: str, done: int, total: int, nbytes: int = 0) -> None:
        """Record one step; write a line when ``interval`` has passed since the last one."""
        now = self.clock()
        self.stages.setdefault(stage, self.last_call)
        self.last_call = now
        self.bytes += nbytes
        self.state = (stage, done, total)
        if now - self.last_line >= self.interval:
            self._write(now)

    def close(self) -> None:
        """Write the last state, unless the last line already showed it."""
        if self.state is not None and self.state != self.written:
            self._write(self.clock())

    def line(self, now: float) -> str:
        """The line for the current state at time ``now``."""
        if self.state is None:
            return ""
        stage, done, total = self.state
        total = max(total, 1)
        elapsed = now - self.stages[stage]
        parts = [f"{stage}: {min(done, total) / total:.0%} ({done}/{total})"]
        if self.bytes:
            parts.append(f"{self.bytes / max(now - self.start, 1e-9) / 1e6:.1f} MB/s")
        elif elapsed > 0 and done:
            parts.append(f"{done / elapsed:.2f}/s")
        if done >= total:
            parts.append(f"done in {_duration(elapsed)}")
        elif done > 0 and elapsed > 0:
            parts.append(f"ETA {_duration(elapsed / done * (total - done))}")
        return ", ".join(parts)

    def _write(self, now: float) -> None:
        text = self.line(now)
        stream = self.stream or sys.stderr
        stream.write(text + "\n")
        stream.flush()
        log.info("%s", text)
        self.last_line, self.written = now, self.state


@contextlib.contextmanager
def progress_bars(transient: bool = True, *, plain: bool | None = None) -> Iterator[Callback]:
    """Show one bar per stage while the block runs (plain lines when stderr is not a terminal).

    Args:
        transient: remove the bars when the block ends.
        plain: write lines instead of bars (default: when standard error is not a terminal).

    Yields:
        ``callback(stage, done, total, nbytes=0)``: the first call for a stage adds its bar;
        ``nbytes`` (input bytes processed by this step) feeds the MB/s column.

    Raises:
        MoeLocalError: ``MOE_LOCAL_PROGRESS_SECONDS`` is not a positive number (plain lines only).
    """
    if plain is None:
        plain = not _is_terminal(sys.stderr)
    if plain:
        lines = ProgressLines(line_interval())
        yield lines
        lines.close()  # not on an error: the error's own line says what happened
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=transient) as bar:
        tasks: dict[str, int] = {}
        start = time.perf_counter()
        seen = [0]

        def callback(stage: str, done: int, total: int, nbytes: int = 0) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=max(total, 1), rate="")
            seen[0] += nbytes
            rate = f"{seen[0] / max(time.perf_counter() - start, 1e-9) / 1e6:.1f} MB/s" if seen[0] else ""
            bar.update(tasks[stage], completed=done, total=max(total, 1), rate=rate)

        yield callback


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False
