"""Rich progress bars for long work (quantizing, building the demo), one bar per stage.

Library functions report progress through a plain callback, ``progress(stage, done, total)``
(quantizing adds the input bytes of the step); ``progress_bars`` turns those calls into bars with
a rate and an ETA on standard error, so library code never imports rich.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

Callback = Callable[..., None]


@contextlib.contextmanager
def progress_bars(transient: bool = True) -> Iterator[Callback]:
    """Show one bar per stage while the block runs.

    Args:
        transient: remove the bars when the block ends.

    Yields:
        ``callback(stage, done, total, nbytes=0)``: the first call for a stage adds its bar;
        ``nbytes`` (input bytes processed by this step) feeds the MB/s column.
    """
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
