"""Issue 10, items 3 and 8: output places are checked before any work, and one command at a time
writes an output folder.

Before the fix, two ``medmeta adapt --out R`` run together both reported success while one
silently replaced the other, and ``evaluate --out`` / ``train --out`` found a file in the way
only after the whole computation, as a traceback.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medmeta.cli.main import app
from medmeta.errors import MedmetaError, OutputBusyError, OutputChangedError
from medmeta.io import check_output_folder
from medmeta.output_folder import OutputFolder, lock_path, output_lock

SAMPLE_CASES = Path(__file__).resolve().parents[1] / "sample_data" / "cases"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def cases(tmp_path) -> Path:
    target = tmp_path / "cases"
    shutil.copytree(SAMPLE_CASES, target)
    return target


class _HeldLock:
    """Another process holding the lock of ``folder`` (as a running command would)."""

    def __init__(self, folder: Path) -> None:
        code = textwrap.dedent(f"""
            import sys, time
            from medmeta.output_folder import output_lock
            with output_lock({str(folder)!r}):
                print("held", flush=True)
                time.sleep(120)
        """)
        self.process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture
def held_lock():
    held: list[_HeldLock] = []
    yield lambda folder: held.append(_HeldLock(folder)) or held[-1]
    for lock in held:
        if lock.process.poll() is None:
            lock.kill()


# -- item 3: the output place, checked before any work -------------------------------------------
def _out_is_a_file(tmp: Path) -> Path:
    (tmp / "out").write_text("a file")
    return tmp / "out"


def _parent_is_a_file(tmp: Path) -> Path:
    (tmp / "parent").write_text("a file")
    return tmp / "parent" / "out"


PROBLEMS = [(_out_is_a_file, "exists and is not a folder"), (_parent_is_a_file, "is a file")]


def _command(name: str, out: Path, tmp: Path) -> list:
    """The command with inputs that do not exist: any error but the output's would mean work began."""
    missing = tmp / "missing-checkpoint"
    if name == "adapt":
        return ["adapt", "--checkpoint", missing, "--cases", SAMPLE_CASES, "--out", out]
    if name == "evaluate":
        return ["evaluate", "--checkpoint", missing, "--out", out]
    return ["train", "--protocol", tmp / "missing.yaml", "--out", out]


@pytest.mark.parametrize("command", ["adapt", "evaluate", "train"])
@pytest.mark.parametrize("make, message", PROBLEMS)
def test_output_problems_are_one_line_errors_before_any_work(command, make, message, tmp_path):
    out = make(tmp_path)
    result = invoke(*_command(command, out, tmp_path))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert "missing" not in result.output.replace(str(tmp_path), "")  # the inputs were never looked at


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into a read-only folder")
def test_a_read_only_parent_is_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(MedmetaError, match="is not writable"):
            check_output_folder(parent / "out")
    finally:
        parent.chmod(0o755)


@pytest.mark.parametrize("command", ["adapt", "evaluate", "train"])
def test_a_parent_without_write_permission_is_refused_before_any_work(command, tmp_path, monkeypatch):
    """The same check as seen by any user (simulated: root bypasses permissions)."""
    import medmeta.io

    parent = tmp_path / "ro"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(medmeta.io.os, "access", lambda p, mode: False if Path(p) == parent else real_access(p, mode))
    result = invoke(*_command(command, parent / "out", tmp_path))
    assert result.exit_code == 2 and "is not writable" in result.output, result.output


def test_missing_parents_are_created(trained_run, cases, tmp_path):
    out = tmp_path / "new" / "deeper" / "report"
    result = invoke("adapt", "--checkpoint", trained_run, "--cases", cases, "--out", out, "--no-stability")
    assert result.exit_code == 0, result.output
    assert (out / "predictions.csv").is_file()


# -- item 8: one writer at a time ----------------------------------------------------------------
@pytest.mark.parametrize("command", ["adapt", "evaluate", "train"])
def test_a_folder_locked_by_another_process_is_refused_at_once(command, held_lock, tmp_path):
    out = tmp_path / "out"
    held_lock(out)
    result = invoke(*_command(command, out, tmp_path))
    assert result.exit_code == 2, result.output
    assert "another medmeta command is writing this folder" in result.output
    assert not out.exists()


def test_calibrate_is_refused_while_the_run_folder_is_locked(trained_run, held_lock):
    held_lock(trained_run)
    result = invoke("calibrate", "--checkpoint", trained_run, "--coverage", "0.8")
    assert result.exit_code == 2 and "another medmeta command is writing this folder" in result.output


def test_the_lock_is_released_when_its_holder_is_killed(held_lock, tmp_path):
    out = tmp_path / "out"
    holder = held_lock(out)
    with pytest.raises(OutputBusyError):
        with output_lock(out):
            pass
    holder.kill()  # kill -9: no clean-up code runs
    with output_lock(out):
        pass


def test_the_lock_is_reentrant_within_a_command(tmp_path):
    with output_lock(tmp_path / "out"), output_lock(tmp_path / "out"):
        assert lock_path(tmp_path / "out").name == ".out.medmeta-lock"


def test_two_adapts_into_one_folder_never_both_succeed(trained_run, cases, tmp_path):
    """Two real processes at once: one writes the reports, the other is refused (busy, or the
    folder is no longer empty); the folder holds one complete, unmixed set of reports."""
    out = tmp_path / "report"
    command = [sys.executable, "-m", "medmeta.cli", "adapt", "--checkpoint", str(trained_run), "--cases", str(cases),
               "--out", str(out), "--no-stability"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    codes = sorted(p.returncode for p in processes)
    assert codes == [0, 2], outputs
    refused = outputs[[p.returncode for p in processes].index(2)]
    assert "another medmeta command is writing this folder" in refused or "not empty" in refused
    assert "Traceback" not in refused
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv", "rejected.csv", "report.html", "report.json", "support.csv", "thumbnails"]
    # no temporary folder is left; the empty lock file stays on purpose (see medmeta.output_folder)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".report")) == [".report.medmeta-lock"]


def test_a_destination_changed_meanwhile_is_not_replaced_and_nothing_is_lost(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(out, overwrite=True) as folder:
        out.mkdir()
        (out / "theirs.txt").write_text("written by another tool meanwhile")
        with pytest.raises(OutputChangedError, match="changed while this command ran") as excinfo:
            with folder.writing() as tmp:
                (tmp / "ours.txt").write_text("our results")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.conflict-")]
    assert len(kept) == 1 and (kept[0] / "ours.txt").read_text() == "our results"
    assert str(kept[0]) in str(excinfo.value)


def test_adapt_keeps_its_reports_aside_when_another_writer_changed_out(trained_run, cases, tmp_path, monkeypatch):
    import medmeta.adaptation

    out = tmp_path / "report"
    real_adapt = medmeta.adaptation.adapt

    def adapt_while_someone_writes(*args, **kwargs):
        result = real_adapt(*args, **kwargs)
        out.mkdir()
        (out / "notes.txt").write_text("a colleague's file")
        return result

    monkeypatch.setattr(medmeta.adaptation, "adapt", adapt_while_someone_writes)
    result = invoke("adapt", "--checkpoint", trained_run, "--cases", cases, "--out", out, "--no-stability")
    assert result.exit_code == 2, result.output
    assert "changed while this command ran" in result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    kept = next(p for p in tmp_path.iterdir() if p.name.startswith("report.conflict-"))
    assert (kept / "predictions.csv").is_file()
