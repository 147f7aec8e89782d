"""Progress for long work: a rich bar on a terminal, silence otherwise.

Scripts read --json on stdout and exit codes; a bar is only drawn when stderr
is a terminal, so logs and pipes stay clean.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


class Advance:
    """advance(n) adds n bytes done; advance.set_total(t) fixes the total once it is known."""

    def __init__(self, on_advance: Callable[[int], None] = lambda n: None, on_total: Callable[[int], None] = lambda t: None):
        self._on_advance = on_advance
        self._on_total = on_total

    def __call__(self, n: int) -> None:
        self._on_advance(n)

    def set_total(self, total: int) -> None:
        self._on_total(total)


@contextlib.contextmanager
def progress(description: str, total: int | None, *, enabled: bool | None = None) -> Iterator[Advance]:
    """Yield an Advance. Draws a transfer bar when stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield Advance()
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, transient=True, console=_stderr_console()) as bar:
        task = bar.add_task(description, total=total)
        yield Advance(lambda n: bar.advance(task, n), lambda t: bar.update(task, total=t))


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)
