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


def check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    """Refuse a value outside ``choices`` with a :class:`MedmetaError` naming the option."""
    if value not in choices:
        raise MedmetaError(f"unknown {option} {value!r}; choose from {', '.join(choices)}")
    return value


def check_temperature_options(source: str, sigma: float) -> None:
    """Refuse a ``--temperature-source`` outside the known ones or a negative ``--temperature-sigma``."""
    from medmeta.calibration import TEMPERATURE_SOURCES

    check_choice(source, TEMPERATURE_SOURCES, "--temperature-source")
    if not sigma >= 0:
        raise MedmetaError(f"--temperature-sigma must be >= 0, got {sigma}")
