"""``python -m medmeta.cli``: the same as the ``medmeta`` command."""

from medmeta.cli.main import app

app(prog_name="medmeta")
