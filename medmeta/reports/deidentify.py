"""A diagnosed batch made fit to leave medmeta under a :class:`~medmeta.privacy.PrivacyPolicy`.

:func:`attach_dicom_attributes` reads each DICOM case's header once and keeps the identifying
attributes the policy allows (none by default; ``PatientID`` then also groups the cases by
patient: :mod:`medmeta.reports.patients`). :func:`deidentified` returns the batch with every
file, folder and patient name pseudonymised, for ``--deidentify``. Both run before any report
is written, so every output (files, SRs, PDF, console) sees the same names.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from medmeta.adaptation import AdaptResult
from medmeta.data.reading import scan_format
from medmeta.privacy import PrivacyPolicy


def dicom_header(path: Path) -> Any:
    """The header (pydicom dataset, no pixels) of a DICOM case: the file, or for a series
    folder its first DICOM file by name; None when there is none or it cannot be parsed."""
    import pydicom

    if path.is_dir():  # the files the series was read from (not hidden, not below it)
        from medmeta.data.volumes import _dicom_files

        files = _dicom_files(path)
        if not files:
            return None
        path = files[0]
    elif not path.is_file() or scan_format(path) != "dicom":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - the case was read already; its header adds nothing then
        return None


def attach_dicom_attributes(result: AdaptResult, cases_dir: str | Path, policy: PrivacyPolicy) -> None:
    """Set each DICOM case's ``dicom`` to the identifying attributes ``policy`` allows (read from
    its header under ``cases_dir``); nothing is read when the policy allows none."""
    if not policy.allow:
        return
    for case in result.cases:
        header = dicom_header(Path(cases_dir) / case.path)
        if header is not None:
            case.dicom = policy.attributes(header) or None


def path_map(result: AdaptResult, policy: PrivacyPolicy) -> dict[str, str]:
    """Every path the batch's outputs name (cases, support scans, rejected files) -> its output form."""
    paths = [case.path for case in result.cases]
    paths += [scan["path"] for scans in result.support.values() for scan in scans]
    paths += [path for path, _ in result.rejected] + list(result.unmatched_labels)
    return {path: policy.path(path, result.conditions) for path in paths}


def deidentified(result: AdaptResult, policy: PrivacyPolicy, cases_dir: str | Path | None = None) -> AdaptResult:
    """``result`` as ``--deidentify`` writes it: paths pseudonymised (:meth:`PrivacyPolicy.path`),
    paths and names inside notes and rejection reasons too, the cases folder's location
    (``cases_dir``) dropped from the metadata and replaced by ``CASES`` in text.
    ``result`` itself is unchanged; without ``policy.deidentify`` it is returned as it is."""
    if not policy.deidentify:
        return result
    names = path_map(result, policy)
    cases = [dataclasses.replace(case, path=names[case.path]) for case in result.cases]
    support = {
        condition: [{**scan, "path": names[scan["path"]]} for scan in scans] for condition, scans in result.support.items()
    }
    scrub = policy.scrubber(names, cases_dir, keep=result.conditions)
    rejected = [(names[path], scrub(reason)) for path, reason in result.rejected]
    metadata = {
        **result.metadata,
        "cases_dir": None,
        "notes": [scrub(note) for note in result.metadata.get("notes", [])],
        "deidentified": {"method": "HMAC-SHA256 with a secret salt, first 16 hex digits", "reference_uids": "replaced"},
    }
    return dataclasses.replace(
        result, cases=cases, support=support, rejected=rejected, metadata=metadata,
        unmatched_labels=[names[path] for path in result.unmatched_labels],
    )
