"""``medmeta``: meta-train on common conditions, adapt to rare ones, evaluate.

``medmeta --help``, ``--version`` and argument errors must answer at once, so nothing imported
here at start-up may import torch or MONAI: this module imports Typer, Rich and the command
modules, which import their heavy machinery inside the command functions.
"""

from __future__ import annotations

from typing import Annotated

import typer

from medmeta.cli import adapt, calibrate, evaluate, train
from medmeta.progress import set_quiet

app = typer.Typer(
    name="medmeta",
    help="Few-shot diagnosis of rare conditions: meta-train on common conditions, adapt to a handful of labelled scans.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Help texts are plain text: Rich markup would take "[default: protocol's]" for a style tag
    # and drop it, so every default is shown as written.
    rich_markup_mode=None,
)
app.command("train")(train.train)
app.command("adapt")(adapt.adapt)
app.command("evaluate")(evaluate.evaluate)
app.command("calibrate")(calibrate.calibrate)


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
        typer.Option("--quiet", "-q", help="No progress bars or information lines; errors and warnings still print. [default: off]"),
    ] = False,
) -> None:
    """medmeta command line."""
    from medmeta.allocator import keep_freed_memory

    set_quiet(quiet)
    keep_freed_memory()


if __name__ == "__main__":  # pragma: no cover
    app()
