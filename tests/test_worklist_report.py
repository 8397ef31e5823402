"""report.html as a worklist: referred cases first, then the least confident; a script allowed by
its hash alone sorts and filters the rows; the page explains its terms, its intended use and the
checkpoint's calibration evidence. The page is opened in headless Chromium when it is installed
(``.ci/run`` installs it): no console error, the rows in worklist order, the filters applied."""

from __future__ import annotations

import base64
import hashlib
import html as html_text
import json
import re
import subprocess
from pathlib import Path

import pytest

from medmeta.adaptation import CaseResult
from medmeta.reports.pdf import find_browser
from medmeta.reports.worklist import script, script_source, worklist_order, worklist_ranks


def _case(path: str, top: float, refer: bool) -> CaseResult:
    return CaseResult(path=path, predicted="a", probabilities=[top, 1 - top], sha256="", distance=0.0, image=None, refer=refer)


def test_worklist_puts_referred_first_then_least_confident():
    cases = [_case("p0", 0.9, False), _case("p1", 0.6, True), _case("p2", 0.55, False), _case("p3", 0.95, True),
             _case("p4", 0.6, True), _case("p5", 0.7, False)]
    assert worklist_order(cases) == [1, 4, 3, 2, 5, 0]  # ties (p1, p4) keep the folder's order
    assert worklist_ranks(cases) == [5, 0, 3, 2, 1, 4]


def test_script_source_is_the_sha256_of_the_exact_text():
    expected = base64.b64encode(hashlib.sha256(b"x = 1;").digest()).decode()
    assert script_source("x = 1;") == f"'sha256-{expected}'"


def _rows(html: str) -> list[dict[str, str]]:
    return [dict(re.findall(r'data-([a-z]+)="([^"]*)"', tag)) | {"hidden": " hidden" in tag}
            for tag in re.findall(r'<tr class="case[^"]*"[^>]*>', html)]


def test_page_lists_cases_in_worklist_order(report):
    html = (report / "report.html").read_text()
    data = json.loads((report / "report.json").read_text())
    rows = _rows(html)
    assert len(rows) == len(data["cases"]) == 30
    assert [int(r["rank"]) for r in rows] == list(range(30))
    by_path = {c["path"]: c for c in data["cases"]}
    referred = [r["refer"] == "refer" for r in rows]
    assert referred == sorted(referred, reverse=True) and 0 < sum(referred) < 30
    for flagged in (True, False):
        confidences = [float(r["confidence"]) for r, f in zip(rows, referred) if f == flagged]
        assert confidences == sorted(confidences)
    # report.json keeps the cases folder's order and gives each case its place in the worklist
    assert sorted(c["worklist_rank"] for c in data["cases"]) == list(range(30))
    ranked = sorted(data["cases"], key=lambda c: c["worklist_rank"])
    assert [c["refer"] for c in ranked] == referred
    assert all(max(by_path[c["path"]]["probabilities"].values()) == pytest.approx(float(r["confidence"]), abs=1e-6)
               for c, r in zip(ranked, rows))


def test_page_allows_its_own_script_and_nothing_else(report):
    html = (report / "report.html").read_text()
    policy = html_text.unescape(re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', html).group(1))
    assert "default-src 'none'" in policy and "img-src 'self' data:" in policy
    inline = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    assert inline == [script()]
    assert f"script-src {script_source(inline[0])};" in policy
    assert "http://" not in html and "https://" not in html and "<script src" not in html


def test_page_explains_its_terms_use_and_calibration_evidence(report, trained_run):
    html = (report / "report.html").read_text()
    for term in ("prediction-set", "coverage", "referral", "stability", "temperature", "ece", "lac", "threshold", "calibrated"):
        assert f'id="g-{term}"' in html
    assert 'id="intended-use"' in html and "not a medical device" in html
    evidence = json.loads((report / "report.json").read_text())["metadata"]["validation_evidence"]
    record = json.loads((Path(trained_run) / "best.json").read_text())["calibration"]
    assert evidence["ece_after_temperature"] == pytest.approx(record["ece_after_val"])
    assert evidence["coverage"] == pytest.approx(record["conformal"]["coverage_val"])
    words = " ".join(html.split())
    assert f"ECE, {evidence['ece_after_temperature']:.3f}" in words
    assert f"held the true condition for {100 * evidence['coverage']:.1f}% of those cases" in words


# -- in a real browser -------------------------------------------------------------------------
def _chromium() -> str:
    found = find_browser()
    if found is None:
        pytest.skip("headless Chromium is not installed (.ci/run installs the Debian package 'chromium')")
    return found


def _open(page: str, *extra: str) -> tuple[str, str]:
    done = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0", *extra, page],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


@pytest.mark.slow
def test_browser_console_messages_are_seen(tmp_path):
    """The check for console errors below can fail: a page that logs one is caught."""
    page = tmp_path / "probe.html"
    page.write_text("<html><body><script>console.error('probe'); missing();</script></body></html>")
    _, log = _open("--dump-dom", page.as_uri())
    assert any(":CONSOLE" in line and "probe" in line for line in log.splitlines())
    assert any(":CONSOLE" in line and "missing is not defined" in line for line in log.splitlines())


@pytest.mark.slow
def test_browser_runs_the_page_without_errors_in_worklist_order(report, tmp_path):
    dom, log = _open("--dump-dom", (report / "report.html").as_uri())
    assert [line for line in log.splitlines() if ":CONSOLE" in line] == []  # no script error, no CSP refusal
    rows = _rows(dom)
    assert len(rows) == 30 and [int(r["rank"]) for r in rows] == list(range(30))
    assert '<div id="worklist-controls">' in dom  # the script ran (it un-hides its controls)
    assert "30 of 30 case(s) shown" in dom
    _open(f"--screenshot={tmp_path / 'report.png'}", "--window-size=1400,2000", (report / "report.html").as_uri())
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize(
    "query, check",
    [
        ("review=refer", lambda r: r["refer"] == "refer"),
        ("review=no-flag", lambda r: r["refer"] == "no-flag"),
        ("label=wrong", lambda r: r["label"] == "wrong"),
        ("condition=triangle_mass", lambda r: r["predicted"] == "triangle_mass"),
        ("patient=patient_07&order=folder", lambda r: r["patient"] == "patient_07"),
    ],
)
def test_browser_filters_rows(report, query, check):
    html_rows = _rows((report / "report.html").read_text())
    dom, log = _open("--dump-dom", (report / "report.html").as_uri() + "?" + query)
    assert [line for line in log.splitlines() if ":CONSOLE" in line] == []
    rows = _rows(dom)
    visible = [r for r in rows if not r["hidden"]]
    expected = [r for r in html_rows if check(r)]
    if "order=folder" in query:
        expected.sort(key=lambda r: int(r["row"]))
    assert visible == expected and visible
    assert f"{len(visible)} of 30 case(s) shown" in dom


@pytest.mark.slow
def test_browser_sorts_by_folder_order(report):
    dom, _ = _open("--dump-dom", (report / "report.html").as_uri() + "?order=folder")
    assert [int(r["row"]) for r in _rows(dom)] == list(range(30))
