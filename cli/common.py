"""What every command shares: turning medmeta's errors into one clear line and an exit code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from medmeta.errors import MedmetaError
from medmeta.progress import console

EXIT_USER_ERROR = 2


@contextmanager
def user_errors() -> Iterator[None]:
    """Print a :class:`MedmetaError` as ``error: <file>: <reason>`` and exit 2, no traceback."""
    try:
        yield
    except MedmetaError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
