"""``medmeta``: meta-train on common conditions, adapt to rare ones, evaluate.

``medmeta --help``, ``--version`` and argument errors must answer at once, so nothing imported
here at start-up may import torch or MONAI: this module imports Typer, Rich and the command
modules, which import their heavy machinery inside the command functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import HAS_RICH, TyperCommand, TyperGroup, TyperOption

from medmeta.cli import adapt, calibrate, evaluate, train
from medmeta.progress import set_quiet

#: Shown for an on/off flag (``--resume`` style, without a ``--no-...`` twin) that is off by default;
#: Typer and Click show no default for those.
FLAG_OFF_DEFAULT = "[default: off]"


@contextmanager
def _help_as_plain_text(objects: Iterable[Any]) -> Iterator[None]:
    """While help is formatted, escape the Rich markup in the help texts of ``objects``.

    Typer's Rich help reads every help text as Rich markup, where ``[default: protocol's]`` or
    ``[default: --lr]`` is a style tag and disappears. Escaping the text at format time (not at
    definition) keeps the written help strings untouched for anything else that reads them.
    Off-by-default flags also get ``[default: off]``.
    """
    saved: list[tuple[Any, str, Any]] = []
    try:
        for obj in objects:
            for attr in ("help", "short_help"):
                text = getattr(obj, attr, None)
                if isinstance(text, str) and text:
                    saved.append((obj, attr, text))
                    setattr(obj, attr, escape(text))
            if _is_off_flag(obj):
                written = next((t for o, a, t in saved if o is obj and a == "help"), None)
                if written is None:
                    saved.append((obj, "help", obj.help))
                if "[default:" not in (written or ""):
                    obj.help = f"{obj.help or ''} {escape(FLAG_OFF_DEFAULT)}".strip()
        yield
    finally:
        for obj, attr, text in reversed(saved):
            setattr(obj, attr, text)


def _is_off_flag(param: Any) -> bool:
    return (
        isinstance(param, TyperOption)
        and param.is_bool_flag
        and not param.secondary_opts
        and not param.is_eager
        and param.default is False
    )


def _rich_help(obj: Any) -> bool:
    return HAS_RICH and getattr(obj, "rich_markup_mode", None) == "rich"


class _Command(TyperCommand):
    """A command whose help texts are shown as written (see :func:`_help_as_plain_text`)."""

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        if not _rich_help(self):
            return super().format_help(ctx, formatter)
        with _help_as_plain_text([self, *self.params]):
            return super().format_help(ctx, formatter)


class _Group(TyperGroup):
    """The ``medmeta`` group: its own options and its commands' one-line help shown as written."""

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        if not _rich_help(self):
            return super().format_help(ctx, formatter)
        commands = [self.get_command(ctx, name) for name in self.list_commands(ctx)]
        with _help_as_plain_text([self, *self.params, *(c for c in commands if c is not None)]):
            return super().format_help(ctx, formatter)


app = typer.Typer(
    name="medmeta",
    help="Few-shot diagnosis of rare conditions: meta-train on common conditions, adapt to a handful of labelled scans.",
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.command("train", cls=_Command)(train.train)
app.command("adapt", cls=_Command)(adapt.adapt)
app.command("evaluate", cls=_Command)(evaluate.evaluate)
app.command("calibrate", cls=_Command)(calibrate.calibrate)


def _print_version(value: bool) -> None:
    if value:
        from medmeta import __version__

        typer.echo(f"medmeta {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="No progress bars or information lines; errors and warnings still print."),
    ] = False,
) -> None:
    """medmeta command line."""
    set_quiet(quiet)


if __name__ == "__main__":  # pragma: no cover
    app()
