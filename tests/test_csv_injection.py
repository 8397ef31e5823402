"""No CSV that medmeta writes carries a cell a spreadsheet would run as a formula (OWASP)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medmeta.cli.main import app
from medmeta.io import atomic_write_csv, csv_cell

SAMPLE_CASES = Path(__file__).resolve().parents[1] / "sample_data" / "cases"
HOSTILE = ["=HYPERLINK(\"http://x\",\"y\")", "+1+1", "-2+3", "@SUM(A1)", "\tTAB", "\rCR"]


def rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def runs_as_formula(cell: str) -> bool:
    return cell.startswith(("=", "+", "-", "@", "\t", "\r"))


@pytest.mark.parametrize("text", HOSTILE)
def test_cells_that_would_run_as_formulas_get_a_leading_quote(text):
    assert csv_cell(text) == "'" + text
    assert csv_cell("melanoma") == "melanoma" and csv_cell(-1.5) == -1.5 and csv_cell(3) == 3


def test_the_csv_writer_neutralises_header_and_cells_and_keeps_the_rest(tmp_path):
    path = tmp_path / "out.csv"
    atomic_write_csv(path, ["path", "=cmd"], [["a.png", text] for text in HOSTILE] + [["b.png", 0.25]])
    table = rows(path)
    assert table[0] == ["path", "'=cmd"]
    assert [row[1] for row in table[1:-1]] == ["'" + text for text in HOSTILE]
    assert table[-1] == ["b.png", "0.25"]


def test_adapt_reports_neutralise_hostile_condition_names_and_labels(trained_run, tmp_path):
    cases = tmp_path / "cases"
    shutil.copytree(SAMPLE_CASES, cases)
    (cases / "support" / "triangle_mass").rename(cases / "support" / "=HYPERLINK(1)")
    labels = tmp_path / "labels.csv"
    text = (SAMPLE_CASES / "labels.csv").read_text().replace("triangle_mass", "=HYPERLINK(1)").replace("gradient_halo", "@SUM(1)")
    labels.write_text(text)
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["adapt", "--checkpoint", str(trained_run), "--cases", str(cases), "--labels", str(labels), "--out", str(out), "--no-stability"]
    )
    assert result.exit_code == 0, result.output
    table = rows(out / "predictions.csv")
    header, body = table[0], table[1:]
    assert "p_=HYPERLINK(1)" in header  # starts with p_: not a formula, left as it is
    assert not any(runs_as_formula(cell) for row in table for cell in row)
    predicted, labels_column = header.index("predicted"), header.index("label")
    assert "'=HYPERLINK(1)" in {row[predicted] for row in body}
    assert {"'=HYPERLINK(1)", "'@SUM(1)"} <= {row[labels_column] for row in body}


def test_episode_manifests_neutralise_hostile_class_names(tmp_path):
    from medmeta.data.episodes import EpisodeSampler
    from medmeta.data.records import ImageRecord

    records = {name: [ImageRecord(key=f"{name}/{i}", label=name, patient_id=f"-p{i}") for i in range(3)] for name in ("=a", "-b")}
    EpisodeSampler(records, way=2, shot=1, query=1, seed=0).save_manifest(tmp_path / "m.csv", range(2))
    table = rows(tmp_path / "m.csv")
    assert not any(runs_as_formula(cell) for row in table for cell in row)
    assert {"'=a", "'-b"} <= {row[2] for row in table[1:]}
