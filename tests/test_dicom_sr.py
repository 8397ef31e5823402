"""DICOM Structured Reports (``medmeta adapt --dicom-sr``), read back with pydicom and highdicom."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage
from typer.testing import CliRunner

from medmeta.reports.dicom_sr import SCHEME
from tests.conftest import SAMPLE_DATA

CASES = SAMPLE_DATA / "cases"


@pytest.fixture(scope="module")
def sr_report(trained_run, tmp_path_factory) -> Path:
    from medmeta.cli.main import app

    out = tmp_path_factory.mktemp("sr") / "out"
    done = CliRunner().invoke(app, ["adapt", "--checkpoint", str(trained_run), "--cases", str(CASES), "--out", str(out),
                                    "--no-saliency", "--dicom-sr"])
    assert done.exit_code == 0, done.output
    return out


def _groups(path: Path):
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.ComprehensiveSR) and isinstance(sr.content, hd.sr.MeasurementReport)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    return sr, groups[0]


def _meaning(item) -> str:
    return item.value.meaning if hasattr(item.value, "meaning") else str(item.value)


def test_one_sr_per_case_that_reads_back_with_the_diagnosis(sr_report):
    report = json.loads((sr_report / "report.json").read_text())
    conditions = report["conditions"]
    series, instances = {}, set()
    for case in report["cases"]:
        dataset = pydicom.dcmread(sr_report / case["dicom_sr"])
        assert dataset.SOPClassUID == ComprehensiveSRStorage and dataset.file_meta.TransferSyntaxUID
        assert dataset.Modality == "SR" and dataset.CompletionFlag == "PARTIAL" and dataset.VerificationFlag == "UNVERIFIED"
        series.setdefault(dataset.StudyInstanceUID, set()).add(dataset.SeriesInstanceUID)
        instances.add(dataset.SOPInstanceUID)
        sr, group = _groups(sr_report / case["dicom_sr"])
        evaluations = {}
        for item in group.get_qualitative_evaluations():
            evaluations.setdefault(item.name.meaning, []).append(_meaning(item))
        assert evaluations["Predicted condition"] == [case["predicted"]]
        assert evaluations.get("Prediction set member", []) == case["prediction_set"]
        assert evaluations["Referred for review"] == ["Yes" if case["refer"] else "No"]
        measured = {m.name.meaning: m.value for m in group.get_measurements()}
        assert measured == pytest.approx({f"Probability of {c}": case["probabilities"][c] for c in conditions})
        assert all(m.unit.value == "1" and m.unit.scheme_designator == "UCUM" for m in group.get_measurements())
        assert {item.name.scheme_designator for item in group.get_qualitative_evaluations()} == {SCHEME}
    # one series of SRs per study, never one series across studies
    assert all(len(uids) == 1 for uids in series.values())
    assert len(set().union(*series.values())) == len(series) and len(instances) == len(report["cases"])


def test_a_dicom_case_sr_references_its_image_and_joins_its_study(sr_report):
    report = json.loads((sr_report / "report.json").read_text())
    checked = 0
    for case in report["cases"]:
        if not case["path"].endswith(".dcm"):
            continue
        source = pydicom.dcmread(CASES / case["path"], stop_before_pixels=True)
        sr, group = _groups(sr_report / case["dicom_sr"])
        (image,) = group.source_images
        assert image.referenced_sop_instance_uid == source.SOPInstanceUID
        assert image.referenced_sop_class_uid == source.SOPClassUID
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        # the default policy: the patient and study's identifying attributes are left empty
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "AccessionNumber"):
            assert str(sr.get(keyword, "")) == "", keyword
        assert str(source.PatientName) and str(source.PatientID)  # they were there to be left out
        checked += 1
    assert checked >= 5


def test_a_case_that_is_not_dicom_gets_an_sr_without_a_reference(sr_report):
    report = json.loads((sr_report / "report.json").read_text())
    dicom_studies = {pydicom.dcmread(CASES / c["path"], stop_before_pixels=True).StudyInstanceUID
                     for c in report["cases"] if c["path"].endswith(".dcm")}
    others = [c for c in report["cases"] if not c["path"].endswith(".dcm")]
    study_of = {}
    for case in others:
        sr, group = _groups(sr_report / case["dicom_sr"])
        assert not group.source_images and "CurrentRequestedProcedureEvidenceSequence" not in sr
        study_of[case["path"]] = sr.StudyInstanceUID
    assert not set(study_of.values()) & dicom_studies
    # a new study per patient folder (its scans that are not DICOM together), else per case
    by_patient = {}
    for case in others:
        by_patient.setdefault(case["patient"] or case["path"], set()).add(study_of[case["path"]])
    assert all(len(studies) == 1 for studies in by_patient.values())
    assert len(set(study_of.values())) == len(by_patient) and any(len([c for c in others if c["patient"] == p]) > 1
                                                                 for p in by_patient)


def test_deidentified_srs_reference_the_pseudonymised_uids(trained_run, tmp_path):
    from medmeta.cli.main import app
    from medmeta.privacy import PrivacyPolicy

    salt = tmp_path / "salt"
    salt.write_bytes(b"0123456789abcdef0123456789abcdef")
    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["adapt", "--checkpoint", str(trained_run), "--cases", str(CASES), "--out", str(out),
                                    "--no-saliency", "--no-stability", "--dicom-sr", "--deidentify", "--salt-file", str(salt)])
    assert done.exit_code == 0, done.output
    policy = PrivacyPolicy.from_options(deidentify=True, salt_file=salt)
    report = json.loads((out / "report.json").read_text())
    originals = {policy.path(p.relative_to(CASES).as_posix()): p for p in CASES.joinpath("query").rglob("*.dcm")}
    checked = 0
    for case in report["cases"]:
        if case["path"] in originals:
            source = pydicom.dcmread(originals[case["path"]], stop_before_pixels=True)
            sr, group = _groups(out / case["dicom_sr"])
            assert group.source_images[0].referenced_sop_instance_uid == policy.uid(source.SOPInstanceUID)
            assert sr.StudyInstanceUID == policy.uid(source.StudyInstanceUID) != source.StudyInstanceUID
            checked += 1
    assert checked == len(originals) >= 5


def test_every_sr_passes_dciodvfy(sr_report):
    """dicom3tools' validator of DICOM objects against the standard's IOD definitions: no error
    (warnings remain: the private coding scheme's terms, and empty Type 2 patient and study
    attributes, which the default privacy policy leaves empty)."""
    import shutil
    import subprocess

    validator = shutil.which("dciodvfy")
    if validator is None:
        pytest.skip("dciodvfy is not installed (.ci/run installs the Debian package 'dicom3tools')")
    files = sorted((sr_report / "sr").glob("*.dcm"))
    assert len(files) == 30
    for path in files:
        done = subprocess.run([validator, str(path)], capture_output=True, text=True, timeout=60, check=False)
        lines = (done.stdout + done.stderr).splitlines()
        assert "ComprehensiveSR" in lines, lines[:5]
        errors = [line for line in lines if line.startswith("Error")]
        assert errors == [], (path.name, errors)
    # the validator says what is wrong: the same SR without a Type 1 attribute is refused
    broken = pydicom.dcmread(files[0])
    del broken.ValueType
    broken.save_as(sr_report.parent / "broken.dcm")
    done = subprocess.run([validator, str(sr_report.parent / "broken.dcm")], capture_output=True, text=True, timeout=60, check=False)
    assert "Error - Missing attribute Type 1 Required Element=<ValueType>" in done.stdout + done.stderr


def test_srs_of_one_study_share_a_series_and_say_their_character_set(tmp_path):
    """Two images of one study and one of another: two series, one per study; every SR is UTF-8."""
    from pydicom.dataset import Dataset

    from medmeta.adaptation import CaseResult
    from medmeta.privacy import PrivacyPolicy
    from medmeta.reports.dicom_sr import SrWriter

    def header(study: str, instance: str) -> Dataset:
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", instance
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, study + ".1"
        ds.PatientName, ds.PatientID = "Ünïcode^Name", "ID1"
        return ds

    writer = SrWriter(["a", "b"], {"medmeta_version": "0", "method": "protonet"}, PrivacyPolicy(frozenset({"PatientName"})))
    case = CaseResult(path="query/x.dcm", predicted="a", probabilities=[0.7, 0.3], sha256="0", distance=0.0, image=None,
                      prediction_set=["a"])
    for index, (study, instance) in enumerate([("1.2.3", "1.2.3.1.1"), ("1.2.3", "1.2.3.1.2"), ("1.2.4", "1.2.4.1.1")]):
        writer.write(case, index, header(study, instance), tmp_path / f"{index}.dcm")
    read = [pydicom.dcmread(tmp_path / f"{index}.dcm") for index in range(3)]
    assert read[0].SeriesInstanceUID == read[1].SeriesInstanceUID != read[2].SeriesInstanceUID
    assert all(ds.SpecificCharacterSet == "ISO_IR 192" for ds in read)
    assert str(read[0].PatientName) == "Ünïcode^Name" and read[0].PatientID == ""  # allowed, and not
