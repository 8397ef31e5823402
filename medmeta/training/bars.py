"""Progress bars for episode loops (validation, calibration): ``run_episodes`` reports every
finished episode through ``on_episode``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from medmeta.progress import make_progress


@contextmanager
def episode_bar(description: str, total: int, quiet: bool = False, within: Any = None) -> Iterator[Callable[[Any], None]]:
    """Yield an ``on_episode`` callback that advances a bar of ``total`` episodes.

    ``within`` is a live :class:`rich.progress.Progress` (e.g. the meta-training bar): the bar is
    then a task of it, removed when done, since only one live display can run at a time.
    Otherwise the bar is its own, and vanishes when done."""
    if within is not None:
        task = within.add_task(description, total=total, status="")
        try:
            yield lambda _outputs: within.advance(task)
        finally:
            within.remove_task(task)
        return
    with make_progress(transient=True, disable=quiet) as progress:
        task = progress.add_task(description, total=total, status="")
        yield lambda _outputs: progress.advance(task)
