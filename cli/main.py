"""``medmeta``: meta-train on common conditions, adapt to rare ones, evaluate."""

from __future__ import annotations

import typer

from medmeta.cli import adapt, calibrate, evaluate, train

app = typer.Typer(
    name="medmeta",
    help="Few-shot diagnosis of rare conditions: meta-train on common conditions, adapt to a handful of labelled scans.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("train")(train.train)
app.command("adapt")(adapt.adapt)
app.command("evaluate")(evaluate.evaluate)
app.command("calibrate")(calibrate.calibrate)


@app.callback()
def _main() -> None:
    """medmeta command line."""


if __name__ == "__main__":  # pragma: no cover
    app()
