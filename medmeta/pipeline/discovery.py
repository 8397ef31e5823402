"""Finding the scans in a cases folder, with every path accounted for.

Every path under ``support/`` and ``query/`` ends up in exactly one of two lists: the files to
read, or ``rejected`` with a fixed-wording reason. Nothing is skipped silently. The rule:

- **Symbolic links are followed**, to files and to folders, wherever they point; each scan
  keeps the path of the link inside the cases folder. A link whose target lies outside the
  cases folder is followed too, and listed in :attr:`CaseFiles.outside_links`, which the report
  states as a note.
- A **broken link** (its target does not exist) is rejected.
- A **link loop** (a folder that would contain itself, or a chain of links that never ends)
  is rejected once, at the link that closes the loop, and is not followed.
- Anything that is **not a regular file or folder** (a FIFO, a socket, a device) is rejected
  without being opened, so a FIFO can never block the batch.
- **Hidden** files and folders (names starting with ``.``, e.g. ``.DS_Store``) are rejected
  with the reason ``hidden file, not read`` (a hidden folder is one row, not one per file).
- A folder that cannot be listed (permissions) is rejected as one row.
- A file directly in ``support/`` (not in a condition folder) is rejected.
- More than :data:`MAX_CASE_FILES` entries (e.g. links that fan out without a loop) stop the
  batch with a clear error instead of walking without end.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from medmeta.errors import CasesError

#: The most entries (files and rejected paths) one cases folder may hold.
MAX_CASE_FILES = 200_000

#: Reasons a path is rejected before it is read (fixed wording; docs/reliability.md lists them).
BROKEN_LINK = "broken symbolic link (its target does not exist)"
LINK_LOOP = "symbolic link loop (a folder that contains itself); not followed"
HIDDEN_FILE = "hidden file, not read"
HIDDEN_FOLDER = "hidden folder, not read"
UNLISTABLE = "folder cannot be listed (permission denied or unreadable)"
OUTSIDE_CONDITION = "not inside a condition folder (expected support/<condition>/<scans>)"
UNEXAMINABLE = "cannot be examined (permission denied or removed during the walk)"


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def not_regular(kind: str) -> str:
    """The reason for a path that is neither a regular file nor a folder."""
    return f"not a regular file ({kind}); not opened"


#: Every reason :func:`discover_cases` gives.
DISCOVERY_REASONS = (
    BROKEN_LINK, LINK_LOOP, HIDDEN_FILE, HIDDEN_FOLDER, UNLISTABLE, OUTSIDE_CONDITION, UNEXAMINABLE,
    *(not_regular(kind) for kind in ("FIFO", "socket", "device", "special file")),
)


@dataclass
class CaseFiles:
    """What :func:`discover_cases` found.

    Attributes:
        support: ``{condition: [files]}`` in folder order, files sorted by path.
        query: the case files, sorted by path.
        rejected: ``(path relative to the cases folder, reason)`` of every path not to be read.
        outside_links: relative paths of the symbolic links whose target leaves the cases folder.
    """

    root: Path
    support: dict[str, list[Path]] = field(default_factory=dict)
    query: list[Path] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    outside_links: list[str] = field(default_factory=list)

    def relative(self, path: Path) -> str:
        """``path`` relative to the cases folder, as text any report can hold (see
        :func:`display_path`)."""
        return display_path(path.relative_to(self.root))


def display_path(path: Path) -> str:
    """``path`` as text that any report can hold: a file name byte that is not UTF-8 (possible on
    POSIX file systems) is written as ``\\xNN`` instead of failing the batch when reports are
    written."""
    return os.fsencode(path.as_posix()).decode("utf-8", "backslashreplace")


class _Walker:
    """Depth-first walk that follows links, detects loops by the (device, inode) of the folders
    on the current path, and files every entry as to-read or rejected."""

    def __init__(self, found: CaseFiles) -> None:
        self.found = found
        self.real_root = Path(os.path.realpath(found.root))
        self.count = 0

    def reject(self, path: Path, reason: str) -> None:
        self._tick()
        self.found.rejected.append((self.found.relative(path), reason))

    def _tick(self) -> None:
        self.count += 1
        if self.count > MAX_CASE_FILES:
            raise CasesError(
                f"{self.found.root}: more than {MAX_CASE_FILES:,} files and folders under support/ and query/ "
                "(symbolic links that fan out?); refused"
            )

    def classify(self, path: Path) -> tuple[str, os.stat_result | None]:
        """``("file" | "folder" | "rejected", stat)``; rejects what cannot be read."""
        if path.name.startswith("."):
            try:
                is_dir = path.is_dir()
            except OSError:
                is_dir = False
            self.reject(path, HIDDEN_FOLDER if is_dir else HIDDEN_FILE)
            return "rejected", None
        try:
            info = path.stat()  # follows links
        except OSError as exc:
            if path.is_symlink():
                self.reject(path, LINK_LOOP if exc.errno == errno.ELOOP else BROKEN_LINK)
            else:
                self.reject(path, UNEXAMINABLE)
            return "rejected", None
        if path.is_symlink() and not _inside(Path(os.path.realpath(path)), self.real_root):
            self.found.outside_links.append(self.found.relative(path))
        if stat.S_ISDIR(info.st_mode):
            return "folder", info
        if stat.S_ISREG(info.st_mode):
            return "file", info
        self.reject(path, not_regular(_special_kind(info.st_mode)))
        return "rejected", None

    def files(self, folder: Path, ancestors: frozenset[tuple[int, int]]) -> list[Path]:
        """Every regular file under ``folder`` (already classified as a folder), sorted."""
        try:
            entries = sorted(Path(entry.path) for entry in os.scandir(folder))
        except OSError:
            self.reject(folder, UNLISTABLE)
            return []
        out: list[Path] = []
        for path in entries:
            kind, info = self.classify(path)
            if kind == "file":
                self._tick()
                out.append(path)
            elif kind == "folder":
                key = (info.st_dev, info.st_ino)
                if key in ancestors:
                    self.reject(path, LINK_LOOP)
                else:
                    out.extend(self.files(path, ancestors | {key}))
        return out


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def discover_cases(cases_dir: str | Path) -> CaseFiles:
    """Find the support scans (``support/<condition>/...``) and the cases (``query/...``) under
    ``cases_dir`` by the rule in this module's docstring; checks the layout (a
    :class:`CasesError` names what is missing, carrying the paths rejected so far)."""
    root = Path(cases_dir)
    if not root.is_dir():
        raise CasesError(f"{root}: cases folder not found")
    support_dir, query_dir = root / "support", root / "query"
    if not support_dir.is_dir():
        raise CasesError(f"{root}: no 'support/' folder (expected support/<condition>/<scans>)")
    if not query_dir.is_dir():
        raise CasesError(f"{root}: no 'query/' folder with the cases to diagnose")
    found = CaseFiles(root)
    walker = _Walker(found)
    root_key = lambda p: (p.stat().st_dev, p.stat().st_ino)  # noqa: E731
    try:
        conditions = sorted(Path(entry.path) for entry in os.scandir(support_dir))
    except OSError:
        raise CasesError(f"{support_dir}: the folder cannot be listed (permission denied)") from None
    for path in conditions:
        kind, info = walker.classify(path)
        if kind == "file":
            walker.reject(path, OUTSIDE_CONDITION)
        elif kind == "folder":
            found.support[path.name] = walker.files(path, frozenset({root_key(support_dir), (info.st_dev, info.st_ino)}))
    found.query = walker.files(query_dir, frozenset({root_key(query_dir)}))
    empty = [name for name, files in found.support.items() if not files]
    if empty:
        raise CasesError(f"{support_dir}: condition folder(s) with no scan to read: {', '.join(empty)}", found.rejected)
    if len(found.support) < 2:
        raise CasesError(f"{support_dir}: need at least 2 condition folders, found {len(found.support)}", found.rejected)
    if not found.query:
        raise CasesError(f"{query_dir}: no cases to diagnose (no file to read in the folder)", found.rejected)
    return found
