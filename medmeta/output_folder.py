"""One writer per output folder: a lock held for a whole command, and results that never
replace what another process wrote meanwhile.

Two commands writing the same folder (two ``adapt --out R``, an ``evaluate`` and a ``train``
into one run folder) would otherwise both report success while one silently replaces the other.
A command claims its folder before any work:

- it takes an exclusive lock, the file ``.<name>.medmeta-lock`` beside the folder (an OS file
  lock through ``filelock``: released when the process ends, even by ``kill -9``; the empty
  file itself stays, since deleting it would let two commands lock two different files); a second
  command finds it taken and stops at once with a one-line error (:class:`OutputBusyError`);
- it notes the folder's state (:func:`medmeta.io.folder_fingerprint`); a folder written as a
  whole (adapt's reports) replaces the destination only if that state is unchanged at the end,
  else the new results are kept beside it (:class:`OutputChangedError`), so a writer that
  ignores the lock (another tool, a person) is never overwritten either.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medmeta.errors import MedmetaError, OutputBusyError
from medmeta.io import atomic_folder, check_output_folder, folder_fingerprint

LOCK_SUFFIX = ".medmeta-lock"


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of ``folder``: hidden, beside it (the folder itself may be replaced whole)."""
    folder = Path(os.path.abspath(folder))
    return folder.with_name(f".{folder.name}{LOCK_SUFFIX}")


@contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of ``folder`` for the block, or raise :class:`OutputBusyError` at once.
    Re-entrant within a thread (a command and the library function it calls may both claim)."""
    from filelock import FileLock, Timeout

    path = lock_path(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, timeout=0, is_singleton=True)
        lock.acquire()
    except Timeout:
        raise OutputBusyError(
            f"{folder}: another medmeta command is writing this folder (lock {path}); "
            "wait for it to finish or choose another --out"
        ) from None
    except OSError as exc:
        raise MedmetaError(f"{folder}: cannot lock the output folder ({exc.strerror or exc})") from None
    try:
        yield
    finally:
        lock.release()


class OutputFolder:
    """An output folder claimed for one command (a context manager).

    On entry: the place is checked (:func:`medmeta.io.check_output_folder`: not a file, parent
    writable, empty unless ``overwrite``), locked (:func:`output_lock`) and its state noted in
    ``fingerprint_``. :meth:`writing` then yields a temporary folder that replaces ``path`` as a
    whole, only if nobody changed ``path`` in between.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite

    def __enter__(self) -> "OutputFolder":
        check_output_folder(self.path, self.overwrite)  # the clear reasons first, before any lock file
        self._lock = output_lock(self.path)
        self._lock.__enter__()
        try:
            check_output_folder(self.path, self.overwrite)  # again, now that no medmeta command can race
            self.fingerprint_ = folder_fingerprint(self.path)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._lock.__exit__(*exc_info)

    def has_results(self) -> bool:
        """Whether the folder exists and holds anything."""
        return self.path.is_dir() and any(self.path.iterdir())

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """A temporary folder that becomes ``path`` when the block succeeds (see
        :func:`medmeta.io.atomic_folder`, given the state noted on entry)."""
        with atomic_folder(self.path, self.overwrite, expected=self.fingerprint_) as tmp:
            yield tmp
        self.fingerprint_ = folder_fingerprint(self.path)
