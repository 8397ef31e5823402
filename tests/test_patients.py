"""Cases grouped by patient folder: the patient of a path, the per-patient summary (mean of the
scans' probabilities, disagreement, referrals) and where the reports show them."""

from __future__ import annotations

import csv
import json

import pytest

from medmeta.adaptation import CaseResult
from medmeta.reports.patients import patient_of, patient_summaries

from conftest import SAMPLE_DATA

SAMPLE_DATA_CASES = SAMPLE_DATA / "cases"


@pytest.mark.parametrize(
    "path, patient",
    [
        ("query/patient_07/scan_3.png", "patient_07"),
        ("query/p 1/visit 2/scan.dcm", "p 1"),  # deeper folders: the one under query/
        ("query/case_001.png", None),
        ("query/series_a", None),  # a series folder is the case itself
        ("support/a/x.png", None),
    ],
)
def test_patient_of(path, patient):
    assert patient_of(path) == patient


def _case(path, probabilities, refer=False):
    conditions = ["a", "b"]
    return CaseResult(path=path, predicted=conditions[probabilities.index(max(probabilities))], probabilities=probabilities,
                      sha256="", distance=0.0, image=None, refer=refer)


def test_patient_summaries():
    cases = [
        _case("query/p1/s1.png", [0.9, 0.1]), _case("query/x.png", [0.2, 0.8]), _case("query/p1/s2.png", [0.3, 0.7], refer=True),
        _case("query/p2/s1.png", [0.6, 0.4]), _case("query/p2/s2.png", [0.8, 0.2]),
    ]
    p1, p2 = patient_summaries(cases, ["a", "b"])
    assert (p1.patient, p1.cases, p1.predicted) == ("p1", ["query/p1/s1.png", "query/p1/s2.png"], ["a", "b"])
    assert p1.mean_probabilities == pytest.approx([0.6, 0.4]) and p1.predicted_patient == "a"
    assert p1.disagree and p1.referred == 1
    assert p2.mean_probabilities == pytest.approx([0.7, 0.3]) and not p2.disagree and p2.referred == 0
    assert p1.to_dict(["a", "b"])["mean_probabilities"] == pytest.approx({"a": 0.6, "b": 0.4})


def test_reports_group_sample_data_by_patient(report):
    data = json.loads((report / "report.json").read_text())
    with open(report / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["patient"] for r in rows] == [c["patient"] or "" for c in data["cases"]]
    patients = {p["patient"]: p for p in data["patients"]}
    assert sorted(patients) == ["patient_03", "patient_07", "patient_11", "patient_14"]
    assert len(patients["patient_07"]["cases"]) == 3
    for p in patients.values():
        predicted = [c["predicted"] for c in data["cases"] if c["patient"] == p["patient"]]
        assert p["predicted"] == predicted and p["disagree"] == (len(set(predicted)) > 1)
    html = (report / "report.html").read_text()
    assert 'id="patients"' in html and html.count('<tr class="patient') == 4
    assert html.count("SCANS DISAGREE") == sum(p["disagree"] for p in patients.values())


def test_report_shows_every_support_scan_by_condition(report):
    data = json.loads((report / "report.json").read_text())
    html = (report / "report.html").read_text()
    thumbnails = [scan["thumbnail"] for scans in data["support"].values() for scan in scans]
    assert len(thumbnails) == 15 and all(t.startswith("thumbnails/support/") for t in thumbnails)
    assert all((report / t).stat().st_size > 0 for t in thumbnails)
    assert html.count('class="support-thumb"') == 15 and 'id="support-scans"' in html


def test_inline_report_keeps_support_thumbnails_out_of_the_json(trained_run):
    from medmeta import load_run
    from medmeta.adaptation import adapt
    from medmeta.reports.writer import render_html, report_dict

    result = adapt(load_run(trained_run), SAMPLE_DATA / "cases", stability=False)  # no thumbnail folder: images inline
    assert render_html(result).count('class="support-thumb" src="data:image/png;base64,') == 15
    assert "data:" not in json.dumps(report_dict(result))
    assert all("thumbnail" not in scan for scans in result.support.values() for scan in scans)  # the API's result stays lean


def test_nearest_support_scans_only_when_asked(trained_run):
    from medmeta import load_run
    from medmeta.pipeline.cases import read_cases
    from medmeta.pipeline.head import LearnerHead

    run = load_run(trained_run)
    task = read_cases(SAMPLE_DATA_CASES, run.reader).task
    head = LearnerHead(run.head_learner(run.default_head, None), run.device)
    assert head(task).nearest is None
    found = head(task, nearest=True)
    assert found.nearest.shape == found.nearest_distances.shape == (30, 3)
    assert (found.nearest_distances[:, :-1] <= found.nearest_distances[:, 1:]).all()


def test_each_case_names_its_nearest_support_scans(report, trained_run):
    import numpy as np
    import torch

    from medmeta import load_run
    from medmeta.pipeline.cases import read_cases

    data = json.loads((report / "report.json").read_text())
    html = (report / "report.html").read_text()
    assert all(len(c["nearest_support"]) == 3 for c in data["cases"])
    assert html.count('class="nearest-thumb"') == 90
    # the distances are those between the embeddings ProtoNet compares (its backbone's), recomputed here
    run = load_run(trained_run)
    batch = read_cases(SAMPLE_DATA_CASES, run.reader)
    with torch.no_grad():
        support = run.learner.embed(batch.task.support_images).double()
        query = run.learner.embed(batch.task.query_images).double()
    distances = torch.cdist(query, support).numpy()
    flat = [(c, s["path"]) for c, scans in data["support"].items() for s in scans]
    for i, case in enumerate(data["cases"]):
        order = np.argsort(distances[i], kind="stable")[:3]
        assert [(n["condition"], n["path"]) for n in case["nearest_support"]] == [flat[j] for j in order]
        assert [n["distance"] for n in case["nearest_support"]] == pytest.approx(distances[i][order], abs=1e-6)
