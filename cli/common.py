"""What every command shares: turning medmeta's errors into one clear line and an exit code.

Start-up cost matters here (``medmeta --help`` must answer at once): this module imports only
Typer, Rich and torch-free medmeta modules; anything heavier is imported inside a function.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.markup import escape

from medmeta.errors import MedmetaError
from medmeta.progress import error_console

EXIT_USER_ERROR = 2


@contextmanager
def user_errors() -> Iterator[None]:
    """Print a :class:`MedmetaError` as ``error: <file>: <reason>`` and exit 2, no traceback.

    Errors go to the error console, which ``--quiet`` does not silence.
    """
    try:
        yield
    except MedmetaError as exc:
        error_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER_ERROR) from None


def warn(message: str, label: str = "warning") -> None:
    """``<label> <message>`` on the error console: still shown under ``--quiet``; the message is
    printed as written (brackets in file names or reasons are not taken for Rich markup)."""
    error_console.print(f"[yellow]{escape(label)}[/] {escape(message)}", highlight=False, soft_wrap=True)


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
