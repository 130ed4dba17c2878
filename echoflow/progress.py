"""Progress bars (rich, on stderr) with ETA for every long step; silent when quiet or stderr is not a terminal (CI).

Bars may nest (the audit embeds, indexes and searches inside its own bar) and may be opened from several
threads (the audit asks its sites in parallel): all open bars share one live display, because rich allows only
one at a time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

QUIET_ENV = "ECHOFLOW_QUIET"


def is_quiet(quiet: bool = False) -> bool:
    """Quiet when asked, when ``ECHOFLOW_QUIET=1``, or when stderr is not a terminal.

    "Terminal" is rich's test, so ``TTY_COMPATIBLE=1`` (or ``FORCE_COLOR``) forces bars onto a pipe or file.
    """
    return quiet or os.environ.get(QUIET_ENV) == "1" or not Console(stderr=True).is_terminal


class _Shared:
    """The one live display and how many bars use it."""

    lock = threading.Lock()
    progress: Progress | None = None
    users = 0


@contextmanager
def _live() -> Iterator[Progress]:
    """The shared display: started by the first open bar, stopped (and cleared) when the last one closes."""
    with _Shared.lock:
        if _Shared.progress is None:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TimeRemainingColumn())
            _Shared.progress = Progress(*columns, console=Console(stderr=True), transient=True)
            _Shared.progress.start()
        _Shared.users += 1
        progress = _Shared.progress
    try:
        yield progress
    finally:
        with _Shared.lock:
            _Shared.users -= 1
            if _Shared.users == 0:
                progress.stop()
                _Shared.progress = None


@contextmanager
def progress_bar(
    description: str, *, total: int, completed: int = 0, quiet: bool = False
) -> Iterator[Callable[[int], None]]:
    """A progress bar with ETA; yields ``advance(n)``. A no-op when quiet (see `is_quiet`)."""
    if is_quiet(quiet):
        yield lambda n: None
        return
    with _live() as progress:
        task = progress.add_task(description, total=total, completed=completed)
        try:
            yield lambda n: progress.advance(task, n)
        finally:
            progress.remove_task(task)
