"""Atomic file writes: a report or checkpoint is either complete on disk or absent."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_pieces(path: str | os.PathLike, pieces: Iterable[str]) -> None:
    """Text written piece by piece (a rendered template's stream), never whole in memory;
    atomically, as :func:`atomic_write_bytes`."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(pieces)
            handle.flush()
            os.fsync(handle.fileno())


def json_text(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as JSON text (paths as strings, numpy scalars and arrays as numbers and lists)."""
    return json.dumps(obj, indent=indent, sort_keys=False, default=_json_default)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json_text(obj) + "\n")


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` with every NaN or infinite float (numpy scalars and arrays included)
    replaced by None, so that it serialises as standard JSON (``null``) rather than ``NaN``."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# Bounds on a YAML file the user gives (protocols, --config): its size, and how often it may use
# an alias ("*name"); nested aliases multiply, so a 1 KB file can otherwise expand without end.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_ALIASES = 100


def load_yaml(path: str | os.PathLike) -> Any:
    """``yaml.safe_load`` of the file at ``path`` within :data:`MAX_YAML_BYTES` and
    :data:`MAX_YAML_ALIASES` (``ValueError`` beyond either; ``yaml.YAMLError`` and
    ``UnicodeDecodeError`` as usual)."""
    import yaml

    path = Path(path)
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ValueError(f"larger than {MAX_YAML_BYTES // 1024} KB")

    class BoundedLoader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise ValueError(f"more than {MAX_YAML_ALIASES} YAML aliases (*name): refused as a possible alias bomb")
            return super().compose_node(parent, index)

    return yaml.load(path.read_text(encoding="utf-8"), Loader=BoundedLoader)  # noqa: S506 - a SafeLoader subclass


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP: CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """``value`` as a CSV cell that no spreadsheet runs as a formula: text starting with ``=``,
    ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'`` (as OWASP recommends);
    anything else, numbers included, is written as it is."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def atomic_write_csv(path: str | os.PathLike, header: list[Any], rows: Iterable[Iterable[Any]]) -> None:
    """Write a CSV atomically (UTF-8, ``csv`` module quoting), every cell through :func:`csv_cell`."""
    import csv

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([csv_cell(cell) for cell in header])
            writer.writerows([csv_cell(cell) for cell in row] for row in rows)


def check_output_folder(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output folder that cannot take a complete, unmixed set of results: a path that
    is a file, a parent that is a file, or an existing non-empty folder without ``overwrite``.
    Called before any work, so a user learns of it in a second, not after the computation."""
    from medmeta.errors import MedmetaError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MedmetaError(f"{path}: the output path exists and is not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MedmetaError(f"{path}: cannot create the output folder, {parent} is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise MedmetaError(f"{path}: cannot create the output folder, {parent} is not writable")
            break
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise MedmetaError(f"{path}: the output folder is not empty; choose another --out or pass --overwrite to replace it")
    return path


#: ``expected`` default of :func:`atomic_folder`: no check of the destination.
_ANY = object()


def folder_fingerprint(path: str | os.PathLike) -> tuple | None:
    """What :func:`atomic_folder` compares to tell whether ``path`` changed: ``None`` when it
    does not exist, else the folder's identity and modification time and each entry's name,
    identity, size and modification time."""
    path = Path(path)
    try:
        info = path.stat()
        entries = sorted(
            (entry.name, s.st_ino, s.st_size, s.st_mtime_ns)
            for entry in os.scandir(path)
            for s in (entry.stat(follow_symlinks=False),)
        ) if path.is_dir() else []
    except FileNotFoundError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns, tuple(entries))


@contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False, expected: Any = _ANY) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; when the block succeeds it replaces
    ``path`` as a whole (an older folder there is removed only then, so results never mix and a
    failure leaves the older folder exactly as it was). Checks ``path`` first
    (:func:`check_output_folder`).

    ``expected``: the :func:`folder_fingerprint` of ``path`` when the command started. If
    ``path`` differs from it at the end (another process wrote there meanwhile), nothing is
    replaced: the new folder is kept beside it under a ``.conflict-`` name and an
    :class:`~medmeta.errors.OutputChangedError` says where."""
    import shutil

    # with ``expected`` the folder was checked when the command began; a change since is caught below
    path = check_output_folder(path, overwrite or expected is not _ANY)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if expected is not _ANY and folder_fingerprint(path) != expected:
            _keep_conflicting(tmp, path)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "previous")
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:
                os.replace(old / "previous", path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _keep_conflicting(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` to a unique ``<name>.conflict-<time>-<pid>`` beside ``path`` and
    raise :class:`~medmeta.errors.OutputChangedError`."""
    import time

    from medmeta.errors import OutputChangedError

    kept = path.with_name(f"{path.name}.conflict-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(tmp, kept)
    raise OutputChangedError(
        f"{path}: changed while this command ran (another process wrote there); it was left as it is "
        f"and the new results were kept in {kept}"
    )


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
