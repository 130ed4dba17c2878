"""Progress bars (rich) for every long step; silent when quiet or when stderr is not a terminal (CI)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

QUIET_ENV = "ECHOFLOW_QUIET"


def is_quiet(quiet: bool = False) -> bool:
    """Quiet when asked, when ``ECHOFLOW_QUIET=1``, or when stderr is not a TTY."""
    return quiet or os.environ.get(QUIET_ENV) == "1" or not sys.stderr.isatty()


@contextmanager
def progress_bar(
    description: str, *, total: int, completed: int = 0, quiet: bool = False
) -> Iterator[Callable[[int], None]]:
    """A progress bar with ETA; yields ``advance(n)``. A no-op when quiet."""
    if is_quiet(quiet):
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total, completed=completed)
        yield lambda n: progress.advance(task, n)
