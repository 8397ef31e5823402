"""``medmeta adapt --pdf``: report.html printed by headless Chromium into report.pdf, inside the
report folder's all-or-nothing write; a missing browser is refused before any work and a
failing one leaves no partial reports."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from medmeta.cli.main import app
from medmeta.reports.pdf import find_browser

from conftest import SAMPLE_DATA

CASES = SAMPLE_DATA / "cases"


def _adapt(trained_run, out, *extra):
    return CliRunner().invoke(app, ["adapt", "--checkpoint", str(trained_run), "--cases", str(CASES), "--out", str(out),
                                    "--no-stability", *extra])


@pytest.mark.slow
def test_pdf_is_the_printed_report(trained_run, tmp_path):
    if find_browser() is None:
        pytest.skip("headless Chromium is not installed (.ci/run installs the Debian package 'chromium')")
    out = tmp_path / "report"
    done = _adapt(trained_run, out, "--pdf")
    assert done.exit_code == 0, done.output
    data = (out / "report.pdf").read_bytes()
    assert data.startswith(b"%PDF-")
    assert len(re.findall(rb"/Type\s*/Page[^s]", data)) >= 2  # 30 cases with their images: several pages
    assert not list(out.glob(".*tmp*"))


def test_pdf_without_a_browser_is_refused_before_any_work(trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMETA_BROWSER", str(tmp_path / "no-such-browser"))
    out = tmp_path / "report"
    done = _adapt(trained_run, out, "--pdf")
    assert done.exit_code != 0
    assert "--pdf needs headless Chromium" in done.output and "Traceback" not in done.output
    assert not out.exists() or not any(out.iterdir())


def test_a_failing_browser_leaves_no_partial_reports(trained_run, tmp_path, monkeypatch):
    browser = tmp_path / "broken-browser"
    browser.write_text("#!/bin/sh\nexit 3\n")
    browser.chmod(0o755)
    monkeypatch.setenv("MEDMETA_BROWSER", str(browser))
    out = tmp_path / "report"
    done = _adapt(trained_run, out, "--pdf")
    assert done.exit_code != 0
    assert "could not print the report (exit status 3)" in " ".join(done.output.split())
    assert not out.exists() or not any(out.iterdir())
