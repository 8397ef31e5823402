"""The privacy policy (medmeta.privacy): canaries planted in every identifying DICOM attribute,
in the reference UIDs and in file and folder names must not reach any output unless allowed."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from typer.testing import CliRunner

from medmeta.errors import MedmetaError
from medmeta.privacy import IDENTIFYING, PSEUDONYM, REFERENCE_UIDS, PrivacyPolicy
from tests.conftest import SAMPLE_DATA

SALT = b"a test salt of at least 16 bytes"


# -- the policy --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, kept, suffix",
    [
        ("query/case_001.dcm", ["query"], ".dcm"),
        ("query/patient_07/scan_3.nii.gz", ["query"], ".nii.gz"),
        ("query/series_a", ["query"], ""),
        ("support/triangle_mass/support_01.PNG", ["support", "triangle_mass"], ".PNG"),
        ("support/triangle_mass/deep/er/scan", ["support", "triangle_mass"], ""),
    ],
)
def test_deidentified_paths_keep_structure_condition_and_suffix(path, kept, suffix):
    policy = PrivacyPolicy(deidentify=True, salt=SALT)
    shown = policy.path(path)
    parts = shown.split("/")
    assert parts[: len(kept)] == kept and len(parts) == len(path.split("/"))
    hidden = parts[len(kept):]
    assert all(PSEUDONYM.fullmatch(p) for p in hidden[:-1])
    assert PSEUDONYM.fullmatch(hidden[-1][: len(hidden[-1]) - len(suffix)]) and hidden[-1].endswith(suffix)
    for original in path.split("/")[len(kept):]:
        assert original not in shown


def test_pseudonyms_are_salted_and_consistent():
    a, b = PrivacyPolicy(deidentify=True, salt=SALT), PrivacyPolicy(deidentify=True, salt=SALT[::-1])
    assert a.path("query/p1/x.dcm").split("/")[1] == a.path("query/p1/y.png").split("/")[1]  # one patient, one name
    assert a.pseudonym("p1") != b.pseudonym("p1")
    assert PrivacyPolicy(deidentify=True).pseudonym("p1") != PrivacyPolicy(deidentify=True).pseudonym("p1")  # random salts
    assert PrivacyPolicy().path("query/p1/x.dcm") == "query/p1/x.dcm"  # default: names kept


def test_reference_uids_kept_by_default_replaced_by_deidentify():
    uid = "1.2.826.0.1.3680043.8.498.123"
    assert PrivacyPolicy().uid(uid) == uid and PrivacyPolicy().allows("SOPInstanceUID")
    policy = PrivacyPolicy(deidentify=True, salt=SALT)
    new = policy.uid(uid)
    assert re.fullmatch(r"2\.25\.[1-9][0-9]*", new) and len(new) <= 64 and new == policy.uid(uid) != policy.uid(uid + "4")
    assert not policy.allows("SOPInstanceUID")


def test_no_identifying_attribute_is_allowed_by_default():
    policy = PrivacyPolicy()
    assert not any(policy.allows(keyword) for keyword in IDENTIFYING)
    dataset = pydicom.Dataset()
    dataset.PatientID, dataset.PatientName, dataset.StudyDate = "ID7", "Doe^Jane", "20200101"
    assert policy.attributes(dataset) == {}
    allowed = PrivacyPolicy.from_options(["PatientID,StudyDate"])
    assert allowed.attributes(dataset) == {"PatientID": "ID7", "StudyDate": "20200101"}
    hashed = PrivacyPolicy(frozenset({"PatientID"}), deidentify=True, salt=SALT).attributes(dataset)
    assert hashed == {"PatientID": PrivacyPolicy(salt=SALT).pseudonym("ID7")}


def test_text_replaces_paths_and_their_names():
    policy = PrivacyPolicy(deidentify=True, salt=SALT)
    names = {"query/pat_x/scan_y.dcm": policy.path("query/pat_x/scan_y.dcm")}
    text = policy.text("query/pat_x/scan_y.dcm: unreadable; see scan_y.dcm in pat_x", names)
    assert "pat_x" not in text and "scan_y" not in text and names["query/pat_x/scan_y.dcm"] in text


def test_text_replaces_whole_names_only():
    policy = PrivacyPolicy(deidentify=True, salt=SALT)
    paths = ["query/1/a.dcm", "query/jane doe.dcm", "query/scan/x.png"]
    names = {path: policy.path(path) for path in paths}
    hidden = {part: new for path in paths for part, new in zip(path.split("/"), names[path].split("/"))}
    text = policy.text('1 link to query/1/a.dcm; "jane doe.dcm" in /cases/dir; a scanner; see scan.', names, "/cases/dir")
    assert text == (f'1 link to query/{hidden["1"]}/{hidden["a.dcm"]}; "{hidden["jane doe.dcm"]}" in CASES; '
                    f'a scanner; see {hidden["scan"]}.')
    assert PrivacyPolicy().text("query/1/a.dcm in /cases/dir", names, "/cases/dir") == "query/1/a.dcm in /cases/dir"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"allow": ["PatientNam"]}, "PatientNam is not an identifying attribute"),
        ({"allow": ["Modality"]}, "Modality is not an identifying attribute"),
        ({"salt_file": "SALT"}, "give both or neither"),
        ({"deidentify": True, "salt_file": "SHORT"}, "at least 16 bytes"),
        ({"deidentify": True, "salt_file": "MISSING"}, "cannot read the salt file"),
    ],
)
def test_policy_options_are_checked(tmp_path, options, message):
    (tmp_path / "SALT").write_bytes(SALT)
    (tmp_path / "SHORT").write_bytes(b"short")
    if "salt_file" in options:
        options = {**options, "salt_file": tmp_path / options["salt_file"]}
    with pytest.raises(MedmetaError, match=message):
        PrivacyPolicy.from_options(**options)


def test_every_identifying_keyword_is_a_dicom_attribute():
    for keyword in [*IDENTIFYING, *REFERENCE_UIDS]:
        assert dictionary_VR(keyword)


# -- canaries through medmeta adapt ------------------------------------------------------------
def _canary(keyword: str, index: int) -> str:
    """A value for ``keyword`` of its value representation, unique and found in no normal output."""
    vr = dictionary_VR(keyword)
    if vr == "DA":
        return f"{1801 + index}0203"
    if vr == "TM":
        return f"{index % 24:02d}3131.31{index:02d}"
    if vr == "DT":
        return f"{1801 + index}0203043131"
    if vr == "AS":
        return f"{index:03d}W"
    if vr == "DS":
        return f"{index}31.337"
    return f"CANARY{index:02d}X"


CANARY_UID = "1.2.999.31337.{file}.{index}"
FILE_CANARY = "CANARYFILE"
FOLDER_CANARY = "CANARYPATIENTFOLDER"
SUPPORT_CANARY = "CANARYSUPPORT"


def _plant(source: Path, target: Path, file_index: int) -> dict[str, str]:
    """Copy the DICOM ``source`` to ``target`` with a canary in every identifying attribute and
    reference UID; returns keyword -> canary."""
    dataset = pydicom.dcmread(source)
    planted = {}
    for index, keyword in enumerate(IDENTIFYING):
        planted[keyword] = _canary(keyword, index)
        setattr(dataset, keyword, planted[keyword])
    for index, keyword in enumerate(REFERENCE_UIDS):
        planted[keyword] = CANARY_UID.format(file=file_index, index=index)
        setattr(dataset, keyword, planted[keyword])
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    target.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(target, enforce_file_format=True)
    return planted


@pytest.fixture(scope="module")
def canary_cases(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, str]]:
    """sample_data's cases with canaries: every DICOM support scan and case has them in its
    identifying attributes and UIDs; DICOM cases are named with a file-name canary, some in a
    patient folder with a folder canary; one unreadable file has a canary name. Returns the
    folder, keyword -> canary of one planted file, and the name canaries."""
    root = tmp_path_factory.mktemp("canaries") / "cases"
    shutil.copytree(SAMPLE_DATA / "cases" / "support", root / "support")
    planted: dict[str, str] = {}
    count = 0
    for scan in sorted((root / "support").rglob("*.dcm")):
        planted = _plant(scan, scan.with_name(f"{SUPPORT_CANARY}{count}.dcm"), count)
        scan.unlink()
        count += 1
    shutil.copy(root / "support" / "triangle_mass" / "support_05.png", root / "support" / f"{SUPPORT_CANARY}loose.png")
    for index, scan in enumerate(sorted((SAMPLE_DATA / "cases" / "query").glob("case_*.dcm"))[:4]):
        folder = root / "query" / (f"{FOLDER_CANARY}{index % 2}" if index < 2 else "")
        _plant(scan, folder / f"{FILE_CANARY}{index}.dcm", count)
        count += 1
    shutil.copy(SAMPLE_DATA / "cases" / "query" / "case_001.png", root / "query" / f"{FILE_CANARY}png.png")
    (root / "query" / f"{FILE_CANARY}broken.dcm").write_bytes(b"not a dicom file")
    return root, planted, {"file": FILE_CANARY, "folder": FOLDER_CANARY, "support": SUPPORT_CANARY}


def _adapt(trained_run, cases: Path, out: Path | None, *options: str, exit_code: int = 0):
    from medmeta.cli.main import app

    where = ["--out", str(out)] if out is not None else []  # None: the default, inside the cases folder
    done = CliRunner().invoke(app, ["adapt", "--checkpoint", str(trained_run), "--cases", str(cases), *where,
                                    "--no-saliency", "--no-stability", "--dicom-sr", *options])
    assert done.exit_code == exit_code, done.output
    return done.output


def _found(out: Path, console: str, canaries: list[str]) -> dict[str, list[str]]:
    """Canary -> the outputs (files under ``out``, their names, the console) that hold it."""
    found: dict[str, list[str]] = {}
    files = [p for p in out.rglob("*") if p.is_file()]
    for canary in canaries:
        where = [str(p.relative_to(out)) for p in files if canary.encode() in p.read_bytes() or canary in str(p.relative_to(out))]
        if canary in console:
            where.append("<console>")
        if where:
            found[canary] = where
    return found


def _attribute_canaries(planted: dict[str, str], uids: bool) -> list[str]:
    values = [v for k, v in planted.items() if k in IDENTIFYING]
    if uids:
        values += ["1.2.999.31337."]
    return values


def test_default_policy_lets_no_identifying_attribute_out(trained_run, canary_cases, tmp_path):
    cases, planted, names = canary_cases
    out = tmp_path / "out"
    console = _adapt(trained_run, cases, out)
    assert len(list((out / "sr").glob("*.dcm"))) == 5  # 4 DICOM cases and the PNG: one SR each
    assert _found(out, console, _attribute_canaries(planted, uids=False)) == {}
    # the check finds what is there: file names and reference UIDs are kept by default
    found = _found(out, console, [names["file"], names["folder"], names["support"], "1.2.999.31337."])
    assert {"predictions.csv", "report.json", "report.html", "rejected.csv"} <= set(found[names["file"]])
    assert {"support.csv", "rejected.csv", "<console>"} <= set(found[names["support"]])  # a loose file in support/ is rejected
    assert any(where.startswith("sr/") for where in found["1.2.999.31337."])


def test_deidentify_lets_no_name_or_uid_out(trained_run, canary_cases):
    cases, planted, names = canary_cases
    out = cases / "medmeta-report"  # the default --out, inside the cases folder: its path is printed
    console = _adapt(trained_run, cases, None, "--deidentify")
    assert "Reports in CASES/medmeta-report/" in " ".join(console.split())
    canaries = _attribute_canaries(planted, uids=True) + list(names.values()) + [str(cases), str(cases.parent)]
    assert _found(out, console, canaries) == {}
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["metadata"]["cases_dir"] is None and report["metadata"]["deidentified"]
    patients = [p["patient"] for p in report["patients"]]
    assert len(patients) == 2 and all(PSEUDONYM.fullmatch(p) for p in patients)  # two patient folders, still grouped
    rejected = sorted(row["path"] for row in report["rejected"])
    assert len(rejected) == 2 and rejected[0].startswith("query/") and rejected[1].startswith("support/")
    assert all(PSEUDONYM.fullmatch(path.split("/")[1].split(".")[0]) for path in rejected)


def test_deidentify_with_a_relative_cases_folder(trained_run, canary_cases, monkeypatch):
    """``--cases cases`` (relative, as the README writes it): the folder's name is hidden where
    it starts a path, and the word "cases" in a sentence is left alone."""
    cases, _, names = canary_cases
    monkeypatch.chdir(cases.parent)
    out = cases / "relative-report"
    console = " ".join(_adapt(trained_run, Path(cases.name), Path(cases.name) / "relative-report", "--deidentify").split())
    assert "Reports in CASES/relative-report/" in console and "Diagnosed 5 case(s)" in console
    assert _found(out, console, [*names.values(), str(cases)]) == {}


def test_deidentify_holds_when_the_batch_fails(trained_run, canary_cases, tmp_path):
    """No readable case: the error, the console and the rejected.csv kept for the user name
    neither the files nor the cases folder."""
    cases, _, names = canary_cases
    broken = tmp_path / f"{names['folder']}cases"
    shutil.copytree(cases / "support", broken / "support")
    (broken / "query").mkdir()
    (broken / "query" / f"{names['file']}only.dcm").write_bytes(b"not a dicom file")
    out = tmp_path / "out"
    console = _adapt(trained_run, broken, out, "--deidentify", exit_code=2)
    assert (out / "rejected.csv").is_file() and "CASES/query: none of the 1 case" in " ".join(console.split())
    assert _found(out, console, [*names.values(), str(broken)]) == {}  # (--out is printed: the user chose it)


def test_an_allowed_attribute_appears_and_groups_by_patient_id(trained_run, canary_cases, tmp_path):
    cases, planted, _ = canary_cases
    out = tmp_path / "out"
    console = _adapt(trained_run, cases, out, "--allow-dicom", "PatientID", "--allow-dicom", "PatientName")
    found = _found(out, console, _attribute_canaries(planted, uids=False))
    assert set(found) == {planted["PatientID"], planted["PatientName"]}
    import json

    report = json.loads((out / "report.json").read_text())
    by_path = {case["path"]: case for case in report["cases"]}
    outside = by_path[f"query/{FILE_CANARY}2.dcm"]
    assert outside["dicom"] == {"PatientID": planted["PatientID"], "PatientName": planted["PatientName"]}
    assert outside["patient"] == planted["PatientID"]  # outside a patient folder: its PatientID
    assert by_path[f"query/{FOLDER_CANARY}0/{FILE_CANARY}0.dcm"]["patient"] == f"{FOLDER_CANARY}0"  # the folder first


@pytest.mark.parametrize(
    "options, message",
    [
        (["--allow-dicom", "PatientID,Foo"], "Foo is not an identifying attribute medmeta knows"),
        (["--salt-file", "salt"], "--salt-file is the secret of --deidentify"),
    ],
)
def test_cli_refuses_a_bad_policy_before_any_work(tmp_path, options, message):
    from medmeta.cli.main import app

    (tmp_path / "salt").write_bytes(SALT)
    options = [str(tmp_path / o) if o == "salt" else o for o in options]
    done = CliRunner().invoke(app, ["adapt", "--checkpoint", str(tmp_path / "no-run"), "--cases", str(tmp_path / "no-cases"),
                                    *options])
    assert done.exit_code != 0 and message in " ".join(done.output.split())
    assert "Traceback" not in done.output and not (tmp_path / "no-cases").exists()
