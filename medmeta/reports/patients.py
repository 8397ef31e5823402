"""Cases grouped by patient, with one summary per patient and a flag when a patient's scans
disagree.

A case's patient is the folder directly under ``query/`` that holds it, when the case is not
that folder itself: ``query/patient_07/scan_3.png`` belongs to ``patient_07``. A case outside
any patient folder (``query/case_001.dcm``, or a DICOM series folder ``query/series_a/``) belongs
to its DICOM PatientID when the privacy policy allows that attribute (``--allow-dicom
PatientID``; :mod:`medmeta.privacy`) and the header holds one, else to no patient. The folder
comes first because it is how the user grouped the scans, whatever their formats (a NIfTI file
has no PatientID). Both are shown as the outputs name them (with ``--deidentify``, salted
hashes); by default no identifier is read from inside the files.

A patient's summary averages its scans' calibrated probabilities (the mean is a description of
the scans, not itself calibrated) and names the condition with the highest mean; the scans
*disagree* when their predicted conditions differ, which a clinician should resolve whatever
the mean says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from medmeta.adaptation import CaseResult


def patient_of(path: str, patient_id: str | None = None) -> str | None:
    """The patient of a case at ``path`` (relative to the cases folder) whose allowed DICOM
    ``patient_id`` is given or None (see the module)."""
    parts = PurePosixPath(path).parts
    if len(parts) >= 3 and parts[0] == "query":
        return parts[1]
    return patient_id or None


def case_patient(case: "CaseResult") -> str | None:
    """:func:`patient_of` a diagnosed case."""
    return patient_of(case.path, (case.dicom or {}).get("PatientID"))


@dataclass
class PatientSummary:
    """One patient's cases (paths in the cases folder's order) and their summary.

    Attributes:
        predicted: ``(n_cases,)`` each case's predicted condition.
        mean_probabilities: ``(n_conditions,)`` the mean of the cases' calibrated probabilities.
        predicted_patient: the condition with the highest mean probability.
        disagree: the cases' predicted conditions differ.
        referred: how many of the cases are flagged for review.
    """

    patient: str
    cases: list[str]
    predicted: list[str]
    mean_probabilities: list[float]
    predicted_patient: str
    disagree: bool
    referred: int

    def to_dict(self, conditions: Sequence[str]) -> dict:
        return {
            "patient": self.patient, "cases": self.cases, "predicted": self.predicted,
            "mean_probabilities": dict(zip(conditions, self.mean_probabilities)),
            "predicted_patient": self.predicted_patient, "disagree": self.disagree, "referred": self.referred,
        }


def patient_summaries(cases: "Sequence[CaseResult]", conditions: Sequence[str]) -> list[PatientSummary]:
    """A :class:`PatientSummary` per patient with at least one case, in order of first case."""
    groups: dict[str, list[CaseResult]] = {}
    for case in cases:
        patient = case_patient(case)
        if patient is not None:
            groups.setdefault(patient, []).append(case)
    summaries = []
    for patient, members in groups.items():
        mean = np.mean([case.probabilities for case in members], axis=0)
        predicted = [case.predicted for case in members]
        summaries.append(PatientSummary(
            patient, [case.path for case in members], predicted, [float(p) for p in mean],
            conditions[int(np.argmax(mean))], len(set(predicted)) > 1, sum(case.refer for case in members),
        ))
    return summaries
