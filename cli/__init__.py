"""The ``medmeta`` command line (Typer): one module per command."""
