"""One DICOM Structured Report per case (``medmeta adapt --dicom-sr``), written with highdicom.

Each SR is a Comprehensive SR holding a TID 1500 Measurement Report with one measurement group
(TID 1501) for the case:

- qualitative evaluations: the predicted condition, each condition of the prediction set, and
  whether the case is referred for review (SNOMED CT Yes/No);
- measurements: the calibrated probability of every condition (unit ``1``, UCUM "no units");
- the algorithm (medmeta, its version, method and backbone) as the group's algorithm
  identification, and the device observer "medmeta".

Conditions are medmeta's own names, coded in the private scheme :data:`SCHEME` (a code value
``C<index>``, the name as meaning); the concept names are coded there too. When the case is a
DICOM file the SR belongs to the image's study, lists the image as evidence and names its
SOP Instance UID as the group's source image; the SRs of one study share one new series.
Otherwise the SR joins a new study made for its patient's scans that are not DICOM (one per
patient folder, or per case outside any).

What of the source header reaches the SR is the privacy policy's (:mod:`medmeta.privacy`): the
Type 2 patient and study attributes are empty unless allowed, and the reference UIDs are
pseudonymised by ``--deidentify``. An SR says it is neither complete nor verified: a clinician
has not signed it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from medmeta.privacy import PrivacyPolicy

#: The private coding scheme of medmeta's concepts and condition names (PS3.16: "99" + a name).
SCHEME = "99MEDMETA"
#: Series number of the SRs medmeta writes.
SR_SERIES_NUMBER = 9901

#: The header attributes an SR's evidence copy is made of: the patient and study modules (Type 2:
#: empty unless the policy allows them) besides the reference UIDs and the image's class.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _references_image(header: Any) -> bool:
    """Whether a case's DICOM header (or None) names the instance an SR can reference."""
    return header is not None and all(
        str(getattr(header, k, "") or "") for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    )


def _scheme_identification():
    """The declaration of the private scheme :data:`SCHEME` (PS3.3 C.12.1.1.5: a private scheme
    is identified in the Coding Scheme Identification Sequence)."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "medmeta concepts and the condition names of a support folder"
    item.CodingSchemeResponsibleOrganization = "medmeta"
    return item


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


class SrWriter:
    """Writes the SRs of one batch: ``conditions`` as diagnosed, ``metadata`` of the run
    (report.json's), ``policy`` over what leaves. Each :meth:`write` makes one file."""

    def __init__(self, conditions: list[str], metadata: dict[str, Any], policy: PrivacyPolicy):
        import highdicom as hd

        self.conditions = list(conditions)
        self.metadata = metadata
        self.policy = policy
        self._series: dict[str, str] = {}  # study UID -> the series of medmeta's SRs in it
        self._studies: dict[tuple[str, str], str] = {}  # ("patient" or "case", name) -> the new study of its non-DICOM scans
        self.device_uid = hd.UID()

    def write(self, case, index: int, header: Any, path: Path, patient: str | None = None) -> None:
        """Write ``case`` (a :class:`~medmeta.adaptation.CaseResult`, the ``index``-th of the
        batch, whose DICOM ``header`` is given or None, of ``patient`` if known) as an SR to
        ``path``. The SRs of one study share a series; a case that is not DICOM joins the new
        study of its patient's other such scans, or gets one of its own."""
        import highdicom as hd
        from highdicom.sr import (
            AlgorithmIdentification, CodedConcept, DeviceObserverIdentifyingAttributes, Measurement,
            MeasurementReport, MeasurementsAndQualitativeEvaluations, ObservationContext, ObserverContext,
            QualitativeEvaluation, SourceImageForMeasurementGroup, TrackingIdentifier,
        )
        from pydicom.sr.codedict import codes

        evidence = self._evidence(header, ("patient", patient) if patient else ("case", str(index)))
        series = self._series.setdefault(str(evidence.StudyInstanceUID), hd.UID())
        yes, no = CodedConcept("373066001", "SCT", "Yes"), CodedConcept("373067005", "SCT", "No")
        evaluations = [QualitativeEvaluation(_code("PRED", "Predicted condition"), self._condition(case.predicted))]
        for member in case.prediction_set or []:
            evaluations.append(QualitativeEvaluation(_code("SET", "Prediction set member"), self._condition(member)))
        evaluations.append(QualitativeEvaluation(_code("REFER", "Referred for review"), yes if case.refer else no))
        measurements = [
            Measurement(_code("PROB", f"Probability of {condition}"), float(p), CodedConcept("1", "UCUM", "no units"))
            for condition, p in zip(self.conditions, case.probabilities)
        ]
        meta = self.metadata
        algorithm = AlgorithmIdentification(
            name="medmeta", version=str(meta.get("medmeta_version", "")),
            parameters=[f"method={meta.get('method')}", f"backbone={meta.get('backbone')}", f"head={meta.get('head')}"],
        )
        sources = []
        if _references_image(header):
            sources.append(SourceImageForMeasurementGroup(str(header.SOPClassUID), self.policy.uid(str(header.SOPInstanceUID))))
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=f"medmeta case {index + 1}"),
            algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=evaluations,
            source_images=sources or None,
        )
        observer = ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(uid=self.device_uid, name="medmeta"),
        )
        report = MeasurementReport(
            observation_context=ObservationContext(observer_device_context=observer),
            procedure_reported=CodedConcept("363679005", "SCT", "Imaging"),
            imaging_measurements=[group],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # highdicom's notes on optional content
            sr = hd.sr.ComprehensiveSR(
                evidence=[evidence], content=report, series_instance_uid=series, series_number=SR_SERIES_NUMBER,
                sop_instance_uid=hd.UID(), instance_number=index + 1, manufacturer="medmeta",
                record_evidence=_references_image(header), series_description="medmeta few-shot diagnosis (research software)",
            )
        sr.CodingSchemeIdentificationSequence = [_scheme_identification()]
        if not _references_image(header) and "CurrentRequestedProcedureEvidenceSequence" in sr:
            # highdicom lists the stand-in as evidence; it stands for no instance (Type 1C: absent
            # when the content references none)
            del sr.CurrentRequestedProcedureEvidenceSequence
        sr.save_as(path, enforce_file_format=True)

    def _condition(self, name: str):
        return _code(f"C{self.conditions.index(name)}", name)

    def _evidence(self, header: Any, patient: tuple[str, str]):
        """The evidence the SR is built on: a copy of the image's header reduced to what the
        policy lets out, or for a case that is not DICOM a stand-in naming its ``patient``'s new study."""
        import highdicom as hd
        from pydicom.dataset import Dataset

        evidence = Dataset()
        evidence.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: an allowed name in any script
        allowed = self.policy.attributes(header) if header is not None else {}
        for keyword in _TYPE2:
            setattr(evidence, keyword, allowed.get(keyword, ""))
        if _references_image(header):
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                setattr(evidence, keyword, self.policy.uid(str(getattr(header, keyword))))
            evidence.SOPClassUID = header.SOPClassUID
            return evidence
        # a stand-in, not recorded as evidence: highdicom reads these from every evidence item
        study = self._studies.setdefault(patient, hd.UID())
        evidence.StudyInstanceUID, evidence.SeriesInstanceUID, evidence.SOPInstanceUID = study, hd.UID(), hd.UID()
        evidence.SOPClassUID = _SECONDARY_CAPTURE
        return evidence


def write_dicom_srs(result, cases_dir: str | Path, out: Path, policy: PrivacyPolicy) -> list[str]:
    """One SR per case of ``result`` (original paths, under ``cases_dir``) as ``out/sr/NNNNNN.dcm``,
    in the cases' order; returns the files' paths relative to ``out``."""
    from medmeta.reports.deidentify import dicom_header
    from medmeta.reports.patients import case_patient

    folder = out / "sr"
    folder.mkdir(parents=True, exist_ok=True)
    writer = SrWriter(result.conditions, result.metadata, policy)
    names = []
    for index, case in enumerate(result.cases):
        name = f"{index:06d}.dcm"
        writer.write(case, index, dicom_header(Path(cases_dir) / case.path), folder / name, case_patient(case))
        names.append(f"sr/{name}")
    return names
