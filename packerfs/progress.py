"""Progress for long work: a rich bar on a terminal, silence otherwise.

Scripts read --json on stdout and exit codes; a bar is only drawn when stderr
is a terminal, so logs and pipes stay clean.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


@contextlib.contextmanager
def progress(description: str, total: int | None, *, enabled: bool | None = None) -> Iterator[Callable[[int], None]]:
    """Yield advance(n_bytes). Draws a transfer bar when stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda n: None
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
        yield lambda n: bar.advance(task, n)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)
