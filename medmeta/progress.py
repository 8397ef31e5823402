"""Rich progress bars and console output shared by long-running work.

Two consoles, both on stderr: ``console`` for progress bars and information lines, which
``--quiet`` silences (:func:`set_quiet`), and ``error_console`` for errors and warnings, which is
never silenced. This module imports only Rich (no torch), so the command line can use it at start-up.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
error_console = Console(stderr=True)


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) progress bars and information lines; errors still print."""
    console.quiet = bool(quiet)


def is_quiet() -> bool:
    return bool(console.quiet)


def make_progress(transient: bool = False, disable: bool = False) -> Progress:
    """A progress bar on the shared console; disabled (no output at all) under ``--quiet``."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=disable or is_quiet(),
    )
