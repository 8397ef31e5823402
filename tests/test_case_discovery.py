"""Issue 10, item 1: every path under support/ and query/ is read or rejected, never dropped.

Before the fix, a symlinked folder inside query/ (its scans), a dangling symlink, a symlink
loop and a FIFO appeared in neither predictions.csv nor rejected.csv: ``Path.rglob`` does not
descend into linked folders and ``is_file()`` is false for the rest.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from medmeta.errors import CasesError
from medmeta.pipeline import discovery
from medmeta.pipeline.discovery import (
    BROKEN_LINK,
    HIDDEN_FILE,
    HIDDEN_FOLDER,
    LINK_LOOP,
    OUTSIDE_CONDITION,
    UNLISTABLE,
    discover_cases,
    not_regular,
)

SAMPLE_CASES = Path(__file__).resolve().parents[1] / "sample_data" / "cases"
needs_posix = pytest.mark.skipif(os.name != "posix", reason="symbolic links and FIFOs as POSIX makes them")


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.fixture
def layout(tmp_path) -> Path:
    """A minimal cases folder: two conditions with one file each, one query file."""
    root = tmp_path / "cases"
    _touch(root / "support" / "a" / "1.png")
    _touch(root / "support" / "b" / "1.png")
    _touch(root / "query" / "q.png")
    return root


def _rel(found, paths):
    return sorted(found.relative(p) for p in paths)


@needs_posix
def test_a_linked_folder_in_query_is_followed_and_its_scans_found(layout, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    for i in range(30):
        _touch(elsewhere / f"scan_{i:02d}.png")
    (layout / "query" / "linked").symlink_to(elsewhere, target_is_directory=True)
    found = discover_cases(layout)
    assert _rel(found, found.query) == sorted(["query/q.png"] + [f"query/linked/scan_{i:02d}.png" for i in range(30)])
    assert found.rejected == []
    assert found.outside_links == ["query/linked"]


@needs_posix
def test_links_inside_the_cases_folder_are_followed_without_a_note(layout):
    _touch(layout / "shared" / "s.png")
    (layout / "query" / "via_link").symlink_to(layout / "shared", target_is_directory=True)
    (layout / "query" / "file_link.png").symlink_to(layout / "query" / "q.png")
    (layout / "support" / "c").symlink_to(layout / "shared", target_is_directory=True)
    found = discover_cases(layout)
    assert _rel(found, found.query) == ["query/file_link.png", "query/q.png", "query/via_link/s.png"]
    assert _rel(found, found.support["c"]) == ["support/c/s.png"]
    assert found.outside_links == [] and found.rejected == []


@needs_posix
def test_broken_links_loops_fifos_hidden_and_stray_files_are_rejected_with_reasons(layout):
    query = layout / "query"
    (query / "dangling.dcm").symlink_to(layout / "nowhere.dcm")
    (query / "loop").symlink_to(query, target_is_directory=True)  # query/loop -> query
    (query / "deep").mkdir()
    (query / "deep" / "up").symlink_to(query / "deep", target_is_directory=True)
    (query / "self.png").symlink_to(query / "self.png")  # a chain that never ends (ELOOP)
    os.mkfifo(query / "pipe.dcm")
    _touch(query / ".DS_Store")
    _touch(query / ".git" / "config")
    _touch(layout / "support" / "stray.png")
    found = discover_cases(layout)
    assert _rel(found, found.query) == ["query/q.png"]
    assert sorted(found.rejected) == sorted([
        ("query/dangling.dcm", BROKEN_LINK),
        ("query/loop", LINK_LOOP),
        ("query/deep/up", LINK_LOOP),
        ("query/self.png", LINK_LOOP),
        ("query/pipe.dcm", not_regular("FIFO")),
        ("query/.DS_Store", HIDDEN_FILE),
        ("query/.git", HIDDEN_FOLDER),
        ("support/stray.png", OUTSIDE_CONDITION),
    ])


@needs_posix
def test_a_fifo_is_never_opened(layout):
    """Opening a FIFO for reading blocks until a writer comes: discovery must not open it."""
    os.mkfifo(layout / "query" / "pipe.png")
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("found", discover_cases(layout)), daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "discovery blocked on a FIFO"
    assert outcome["found"].rejected == [("query/pipe.png", not_regular("FIFO"))]


@needs_posix
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any folder, so permissions cannot be denied")
def test_a_folder_that_cannot_be_listed_is_one_rejected_row(layout):
    locked = layout / "query" / "locked"
    _touch(locked / "x.png")
    locked.chmod(0)
    try:
        found = discover_cases(layout)
    finally:
        locked.chmod(0o755)
    assert found.rejected == [("query/locked", UNLISTABLE)]


def test_a_folder_whose_listing_fails_is_one_rejected_row_even_as_root(layout, monkeypatch):
    """The same rule when the listing fails for any OS reason (simulated, since root bypasses
    permissions)."""
    locked = layout / "query" / "locked"
    _touch(locked / "x.png")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(discovery.os, "scandir", scandir)
    found = discover_cases(layout)
    assert found.rejected == [("query/locked", UNLISTABLE)]
    assert _rel(found, found.query) == ["query/q.png"]


def test_a_condition_with_only_rejected_entries_is_an_error_carrying_them(layout):
    for path in (layout / "support" / "b").iterdir():
        path.unlink()
    _touch(layout / "support" / "b" / ".hidden.png")
    with pytest.raises(CasesError, match="no scan to read: b") as excinfo:
        discover_cases(layout)
    assert excinfo.value.rejected == [("support/b/.hidden.png", HIDDEN_FILE)]


@needs_posix
def test_links_that_fan_out_are_bounded(layout, monkeypatch):
    """Links to folders that themselves link twice onward multiply paths without a loop; the walk
    stops at MAX_CASE_FILES with a clear error."""
    monkeypatch.setattr(discovery, "MAX_CASE_FILES", 50)
    level = layout / "fan" / "level_0"
    _touch(level / "x.png")
    for depth in range(1, 8):
        nxt = layout / "fan" / f"level_{depth}"
        nxt.mkdir()
        (nxt / "a").symlink_to(level, target_is_directory=True)
        (nxt / "b").symlink_to(level, target_is_directory=True)
        level = nxt
    (layout / "query" / "fan").symlink_to(level, target_is_directory=True)  # 2**7 = 128 paths
    with pytest.raises(CasesError, match="more than 50 files and folders"):
        discover_cases(layout)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@needs_posix
def test_adapt_accounts_for_every_path_exactly_once(trained_run, tmp_path):
    """The hostile entries of item 1 and a non-UTF-8 name, end to end through ``medmeta adapt``:
    each path under query/ is in exactly one of predictions.csv and rejected.csv, each path under
    support/ in exactly one of support.csv and rejected.csv."""
    from typer.testing import CliRunner

    from medmeta.cli.main import app

    cases = tmp_path / "cases"
    shutil.copytree(SAMPLE_CASES, cases)
    originals = sorted(p.relative_to(cases).as_posix() for p in cases.rglob("*") if p.is_file() and p.name != "labels.csv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pngs = sorted((cases / "query").rglob("*.png"))
    for i in range(30):
        shutil.copy(pngs[i % len(pngs)], elsewhere / f"linked_{i:02d}.png")
    query = cases / "query"
    (query / "linked").symlink_to(elsewhere, target_is_directory=True)
    (query / "dangling.png").symlink_to(tmp_path / "gone.png")
    (query / "loop").symlink_to(query, target_is_directory=True)
    os.mkfifo(query / "pipe.dcm")
    shutil.copy(pngs[0], os.fsdecode(bytes(query) + b"/caf\xe9.png"))  # a Latin-1 byte: not UTF-8
    expected = {
        "query/dangling.png": "rejected", "query/loop": "rejected", "query/pipe.dcm": "rejected",
        "query/caf\\xe9.png": "predicted",
        **{f"query/linked/linked_{i:02d}.png": "predicted" for i in range(30)},
        **{p: ("support" if p.startswith("support/") else "predicted") for p in originals},
    }
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["adapt", "--checkpoint", str(trained_run), "--cases", str(cases), "--out", str(out), "--no-stability"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    seen: dict[str, list[str]] = {}
    for name, kind in (("predictions.csv", "predicted"), ("support.csv", "support"), ("rejected.csv", "rejected")):
        for row in _read_csv(out / name):
            seen.setdefault(row["path"], []).append(kind)
    assert seen == {path: [kind] for path, kind in expected.items()}
    notes = json.loads((out / "report.json").read_text())["metadata"]["notes"]
    assert any("1 symbolic link(s) in the cases folder point outside it and were followed: query/linked" in n for n in notes)
