"""Batch diagnosis reports: ``predictions.csv``, ``support.csv``, ``report.json``,
``report.html``, ``rejected.csv``.

Every path under the cases folder's ``query/`` is in exactly one of ``predictions.csv`` and
``rejected.csv``; every path under ``support/`` in exactly one of ``support.csv`` (columns
``path``, ``condition``, ``sha256``: the support scans the adaptation used) and ``rejected.csv``
(columns ``path``, ``reason``).

The batch's files are written into a temporary folder that replaces ``--out`` only when all of
them are complete (:func:`medmeta.io.atomic_folder`), under the output folder's lock
(:mod:`medmeta.output_folder`): a run never mixes with an older one, and
a failed run leaves older reports exactly as they were. The HTML page uses no external URLs and is rendered by
Jinja2 with autoescaping on. ``medmeta adapt`` writes each case's thumbnail as a PNG file into ``thumbnails/``
beside it as the case is diagnosed (so memory does not grow with the batch); a result whose cases kept their
pixels (``adapt`` without ``thumbnail_dir``) has them inlined as PNG data URIs instead.

``predictions.csv`` columns: ``path``, ``patient`` (the patient folder under ``query/``, empty for
a case outside one: :mod:`medmeta.reports.patients`), ``predicted``, one ``p_<condition>`` per condition,
``prediction_set`` (conditions joined by ``;``, empty for an empty set; absent when the
checkpoint has no conformal calibration), ``refer`` (``true``/``false``) and ``refer_reason``
(reasons joined by ``; ``; both absent when the checkpoint has no referral calibration),
``stability_max_change`` (empty when not computed) and ``label`` (with ``--labels``). A cell
that a spreadsheet would run as a formula (text starting with ``=``, ``+``, ``-``, ``@``, a tab or
a carriage return, e.g. from a condition folder's name) is written with a leading ``'``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from medmeta.adaptation import AdaptResult
from medmeta.io import atomic_write_csv, atomic_write_pieces, json_safe, json_text
from medmeta.reports.patients import case_patient, patient_summaries
from medmeta.reports.thumbnails import oriented, saliency_data_uri, thumbnail_data_uri
from medmeta.reports.worklist import script, script_source, worklist_order, worklist_ranks

if TYPE_CHECKING:
    from medmeta.output_folder import OutputFolder
    from medmeta.privacy import PrivacyPolicy

REPORT_FILES = ("predictions.csv", "support.csv", "report.json", "report.html", "rejected.csv")


def write_rejected(out_dir: str | Path, rejected: list[tuple[str, str]]) -> Path:
    path = Path(out_dir) / "rejected.csv"
    atomic_write_csv(path, ["path", "reason"], [list(row) for row in rejected])
    return path


def write_reports(result: AdaptResult, out_dir: "str | Path | OutputFolder", overwrite: bool = False) -> dict[str, Path]:
    """Write all the report files as one new ``out_dir``; returns their paths. An existing
    non-empty ``out_dir`` is refused unless ``overwrite`` (then it is replaced as a whole).

    ``out_dir`` may be an :class:`~medmeta.output_folder.OutputFolder` the caller claimed before
    computing ``result`` (locked, its state noted): the reports then replace it only if no other
    process wrote there meanwhile. A plain path is claimed here."""
    from medmeta.output_folder import OutputFolder

    if isinstance(out_dir, OutputFolder):
        with out_dir.writing() as tmp:
            write_report_files(result, tmp)
        return {name: out_dir.path / name for name in REPORT_FILES}
    with OutputFolder(out_dir, overwrite) as folder, folder.writing() as tmp:
        write_report_files(result, tmp)
    return {name: Path(out_dir) / name for name in REPORT_FILES}


def write_batch_outputs(
    result: AdaptResult, out: Path, cases_dir: str | Path, policy: "PrivacyPolicy | None" = None,
    dicom_sr: bool = False, pdf: bool = False,
) -> AdaptResult:
    """Everything ``medmeta adapt`` writes besides the thumbnails, into the claimed folder ``out``,
    under the privacy ``policy`` (None: the default, :mod:`medmeta.privacy`): the allowed DICOM
    attributes read from the cases' headers under ``cases_dir``, one DICOM SR per case in
    ``sr/`` with ``dicom_sr``, the report files, and ``report.pdf`` with ``pdf``. Returns the batch
    as the outputs name it (pseudonymised with ``--deidentify``), for what is printed."""
    from medmeta.privacy import DEFAULT_POLICY
    from medmeta.reports.deidentify import attach_dicom_attributes, deidentified

    policy = policy or DEFAULT_POLICY
    attach_dicom_attributes(result, cases_dir, policy)
    if dicom_sr:
        from medmeta.reports.dicom_sr import write_dicom_srs

        for case, name in zip(result.cases, write_dicom_srs(result, cases_dir, out, policy)):
            case.sr = name
    shown = deidentified(result, policy, cases_dir)
    write_report_files(shown, out)
    if pdf:
        from medmeta.reports.pdf import write_pdf

        write_pdf(out / "report.html", out / "report.pdf")
    return shown


def write_report_files(result: AdaptResult, out: Path) -> None:
    """Write the report files into the folder ``out`` (already claimed: the temporary folder of
    :meth:`OutputFolder.writing <medmeta.output_folder.OutputFolder.writing>`, where ``adapt``
    wrote the thumbnails as it went)."""
    paths = {name: out / name for name in REPORT_FILES}
    write_rejected(out, result.rejected)
    atomic_write_csv(
        paths["support.csv"], ["path", "condition", "sha256"],
        [[scan["path"], condition, scan["sha256"]] for condition, scans in result.support.items() for scan in scans],
    )
    has_sets = result.metadata.get("conformal") is not None
    has_referral = result.metadata.get("referral") is not None
    header = ["path", "patient", "predicted", *[f"p_{c}" for c in result.conditions]]
    if has_sets:
        header.append("prediction_set")
    if has_referral:
        header += ["refer", "refer_reason"]
    header.append("stability_max_change")
    has_labels = any(case.label is not None for case in result.cases)
    if has_labels:
        header.append("label")

    def row(case) -> list[str]:
        cells = [case.path, case_patient(case) or "", case.predicted, *[f"{p:.6f}" for p in case.probabilities]]
        if has_sets:
            cells.append(";".join(case.prediction_set or []))
        if has_referral:
            cells += ["true" if case.refer else "false", case.refer_reason]
        cells.append("" if case.stability_max_change is None else f"{case.stability_max_change:.6f}")
        if has_labels:
            cells.append(case.label or "")
        return cells

    # each file is written row by row, case by case: a batch of any size is never whole in memory as text
    atomic_write_csv(paths["predictions.csv"], header, (row(case) for case in result.cases))
    atomic_write_pieces(paths["report.json"], json_pieces(result))
    atomic_write_pieces(paths["report.html"], html_pieces(result))


def report_dict(result: AdaptResult) -> dict[str, Any]:
    """The content of ``report.json`` (standard JSON: NaN and infinities become null): the cases
    in the cases folder's order, each with its ``worklist_rank``."""
    return json.loads("".join(json_pieces(result)))


def json_pieces(result: AdaptResult) -> Iterator[str]:
    """``report.json`` piece by piece, one case at a time (see :func:`report_dict`)."""
    head = {"metadata": result.metadata, "conditions": result.conditions, "support": result.support}
    tail = {
        "patients": [summary.to_dict(result.conditions) for summary in patient_summaries(result.cases, result.conditions)],
        "rejected": [{"path": p, "reason": r} for p, r in result.rejected],
        "metrics": result.metrics,
    }
    yield "{\n"
    for key, value in head.items():
        yield f"  {json.dumps(key)}: {_indented(value)},\n"
    yield '  "cases": ['
    for index, (case, rank) in enumerate(zip(result.cases, worklist_ranks(result.cases))):
        yield ("," if index else "") + "\n    " + _indented(_case_json(result, case, rank), "    ")
    yield "\n  ],\n" if result.cases else "],\n"
    yield ",\n".join(f"  {json.dumps(key)}: {_indented(value)}" for key, value in tail.items()) + "\n}\n"


def _indented(value: Any, prefix: str = "  ") -> str:
    """``value`` as indented standard JSON (NaN and infinities null), nested under ``prefix``."""
    return json_text(json_safe(value)).replace("\n", "\n" + prefix)


def _case_json(result: AdaptResult, case, rank: int) -> dict[str, Any]:
    return {
        "path": case.path,
        "patient": case_patient(case),
        "predicted": case.predicted,
        "probabilities": dict(zip(result.conditions, case.probabilities)),
        "prediction_set": case.prediction_set,
        "refer": case.refer,
        "refer_reason": case.refer_reason,
        "stability_max_change": case.stability_max_change,
        "distance_to_support": case.distance,
        "nearest_support": [{"condition": c, "path": result.support[c][j]["path"], "distance": d} for c, j, d in case.nearest_support],
        "sha256": case.sha256,
        "worklist_rank": rank,
        "saliency": None
        if case.saliency_peak is None
        else {
            "peak_log_odds_drop": case.saliency_peak,
            "odds_factor": _odds_factor(case.saliency_peak),
            "overlay": case.saliency_thumbnail,
        },
        **({"volume": case.volume} if case.volume is not None else {}),
        **({"dicom": case.dicom} if case.dicom else {}),
        **({"dicom_sr": case.sr} if case.sr else {}),
        **({"label": case.label} if case.label is not None else {}),
    }


def render_html(result: AdaptResult) -> str:
    """``report.html`` as one string (:func:`html_pieces` joined)."""
    return "".join(html_pieces(result))


def html_pieces(result: AdaptResult) -> Iterator[str]:
    """``report.html`` piece by piece: the cases in worklist order (:mod:`medmeta.reports.worklist`),
    each row carrying what the page's script sorts and filters by. Each case's row is built as
    it is rendered, so a batch of any size is never in memory as a page."""
    env = Environment(loader=PackageLoader("medmeta.reports", "templates"), autoescape=select_autoescape(default=True))
    template = env.get_template("report.html.j2")
    patients = patient_summaries(result.cases, result.conditions)
    support = _support_with_thumbnails(result)
    disagreeing = {summary.patient for summary in patients if summary.disagree}

    def row(index: int, rank: int) -> dict[str, Any]:
        case = result.cases[index]
        return {
            "row": index,
            "rank": rank,
            "path": case.path,
            "patient": case_patient(case),
            "patient_disagree": case_patient(case) in disagreeing,
            "dicom": case.dicom,
            "predicted": case.predicted,
            "confidence": max(case.probabilities),
            "probabilities": list(zip(result.conditions, case.probabilities)),
            "thumbnail": case.thumbnail
            or thumbnail_data_uri(case.image, oriented=oriented(case.volume)),
            "volume": case.volume,
            "label": case.label,
            "correct": None if case.label is None else case.label == case.predicted,
            "prediction_set": case.prediction_set,
            "refer": case.refer,
            "refer_reasons": case.refer_reason.split("; ") if case.refer_reason else [],
            "stability": case.stability_max_change,
            "nearest": [{"condition": c, "distance": d, **support[c][j]} for c, j, d in case.nearest_support],
            "saliency": _saliency_image(case),
            "saliency_odds_factor": None if case.saliency_peak is None else _odds_factor(case.saliency_peak),
        }

    counts = {c: sum(1 for case in result.cases if case.predicted == c) for c in result.conditions}
    code = script()
    return template.generate(
        script=Markup(code),
        script_source=script_source(code),
        meta=result.metadata,
        conditions=result.conditions,
        support=support,
        cases=(row(index, rank) for rank, index in enumerate(worklist_order(result.cases))),
        n_cases=len(result.cases),
        has_nearest=any(case.nearest_support for case in result.cases),
        patients=sorted(patients, key=lambda s: (not s.disagree, -s.referred)),
        counts=counts,
        referred=sum(1 for case in result.cases if case.refer),
        rejected=result.rejected,
        metrics=result.metrics,
    )


def _odds_factor(peak: float) -> float:
    """``exp(peak)``: how many times hiding the case's most important window divides the odds of
    its prediction (infinite, written null, past float range)."""
    return math.exp(peak) if peak < 709 else math.inf


def _saliency_image(case) -> str | None:
    """The case's saliency overlay: the file ``adapt`` wrote, a data URI made here from the map a
    case kept with its pixels, or None without saliency."""
    if case.saliency_thumbnail is not None:
        return case.saliency_thumbnail
    if case.saliency is None or case.image is None:
        return None
    return saliency_data_uri(case.image, case.saliency, oriented=oriented(case.volume))


def _support_with_thumbnails(result: AdaptResult) -> dict[str, list[dict]]:
    """``result.support`` with each scan's ``thumbnail``: the file ``adapt`` wrote, or a data URI
    made here from ``result.support_images`` for a page that keeps its images inline."""
    if result.support_images is None:
        return result.support
    images = iter(result.support_images)
    return {
        condition: [
            {**scan, "thumbnail": thumbnail_data_uri(next(images), oriented=oriented(scan.get("volume")))}
            for scan in scans
        ]
        for condition, scans in result.support.items()
    }
