"""``--out`` of ``medmeta adapt``: a run never mixes with an older one, a failed run leaves the
older reports as they were, and output problems are found before any work."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medmeta.cli.main import app
from medmeta.errors import MedmetaError
from medmeta.io import atomic_folder, check_output_folder

runner = CliRunner()
SAMPLE_CASES = Path(__file__).resolve().parents[1] / "sample_data" / "cases"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def cases(tmp_path) -> Path:
    target = tmp_path / "cases"
    shutil.copytree(SAMPLE_CASES, target)
    return target


def test_atomic_folder_replaces_a_folder_whole_and_only_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("first")
        assert not out.exists()  # nothing is visible until the block is done
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("failed midway")
    assert digests(out) == {"a.txt": hashlib.sha256(b"first").hexdigest()}
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # nothing of the older run is left
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left behind


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: (p / "out").mkdir() or (p / "out" / "old.csv").write_text("x"), "not empty"),
        (lambda p: (p / "out").write_text("a file"), "not a folder"),
        (lambda p: (p / "parent").write_text("a file"), "is a file"),
    ],
)
def test_output_problems_are_refused_up_front(tmp_path, setup, message):
    setup(tmp_path)
    target = tmp_path / ("parent/out" if message == "is a file" else "out")
    with pytest.raises(MedmetaError, match=message):
        check_output_folder(target)


def test_non_empty_out_is_refused_before_reading_anything(cases, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.html").write_text("older report")
    # the checkpoint does not even exist: the output check comes first
    result = invoke("adapt", "--checkpoint", tmp_path / "missing", "--cases", cases, "--out", out)
    assert result.exit_code == 2
    assert "not empty" in result.output and "--overwrite" in result.output
    assert (out / "report.html").read_text() == "older report"


def test_failed_rerun_leaves_the_previous_reports_byte_identical(trained_run, cases, tmp_path):
    out = tmp_path / "report"
    first = invoke("adapt", "--checkpoint", trained_run, "--cases", cases, "--out", out, "--no-stability")
    assert first.exit_code == 0, first.output
    before = digests(out)
    assert {name for name in before if not name.startswith("thumbnails/")} == {
        "predictions.csv", "support.csv", "report.json", "report.html", "rejected.csv"
    }
    # one per case and support scan and a saliency overlay per case, kept byte for byte too
    assert sum(name.startswith("thumbnails/") for name in before) == 30 + 15 + 30
    for path in (cases / "query").rglob("*"):
        if path.is_file():
            path.write_bytes(b"not a scan any more")
    again = invoke("adapt", "--checkpoint", trained_run, "--cases", cases, "--out", out, "--overwrite")
    assert again.exit_code == 2
    assert "none of the" in again.output and "left untouched" in again.output
    assert digests(out) == before


def test_overwrite_replaces_the_whole_folder(trained_run, cases, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    result = invoke("adapt", "--checkpoint", trained_run, "--cases", cases, "--out", out, "--overwrite", "--no-stability")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv", "rejected.csv", "report.html", "report.json", "support.csv", "thumbnails"]


def test_labels_that_name_no_condition_or_no_case_are_warned_about(trained_run, cases, tmp_path):
    labels = tmp_path / "labels.csv"
    rows = (SAMPLE_CASES / "labels.csv").read_text().splitlines()
    rows += ["query/not_there.png,disc_lesion", "query/case_001.png,no_such_condition"]  # the later row wins
    labels.write_text("\n".join(rows) + "\n")
    result = invoke("adapt", "--checkpoint", trained_run, "--cases", cases, "--labels", labels, "--out", tmp_path / "r", "--no-stability")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "1 path(s) in the labels CSV match no case: query/not_there.png" in text
    assert "label(s) that name no condition of the support" in text and "no_such_condition" in text


def test_a_file_name_that_is_not_utf8_is_reported_escaped_and_the_batch_goes_on(trained_run, cases, tmp_path):
    import csv
    import os

    source = cases / "query" / "case_001.png"
    bad_name = os.fsencode(cases / "query") + b"/case_\xff.png"
    os.rename(os.fsencode(source), bad_name)
    out = tmp_path / "report"
    result = invoke("adapt", "--checkpoint", trained_run, "--cases", cases, "--out", out, "--no-stability")
    assert result.exit_code == 0, result.output
    with open(out / "predictions.csv", newline="", encoding="utf-8") as handle:
        paths = [row["path"] for row in csv.DictReader(handle)]
    assert "query/case_\\xff.png" in paths and len(paths) == 30
    assert "case_\\xff.png" in (out / "report.html").read_text(encoding="utf-8")
