"""``medmeta adapt``: adapt to labelled support scans and diagnose the unlabelled cases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medmeta.cli.common import check_choice, check_temperature_options, user_errors, warn

# Kept in step with medmeta.calibration (a test checks it): importing that here would load torch.
TEMPERATURE_PRIOR_SIGMA = 0.5
CONFORMAL_SOURCES = ("val", "support", "mass")
#: medmeta.calibration.DEFAULT_CALIBRATION_SOURCE (a test checks it)
DEFAULT_SOURCE = "support"
MAX_PIXELS = 50_000_000
#: ``--head`` choices, kept in step with medmeta.heads.list_heads() (a test checks it).
HEAD_NAMES = ("method", "finetune", "logistic", "prototype")
#: ``--transductive`` choices, kept in step with medmeta.transductive.REFINERS (a test checks it).
TRANSDUCTIVE_NAMES = ("soft_kmeans", "bd_cspn", "tim_gd", "alpha_tim")


def adapt(
    checkpoint: Annotated[Path, typer.Option(help="Run folder, NAME.json or NAME.safetensors from `medmeta train`.")],
    cases: Annotated[Path, typer.Option(help="Folder with support/<condition>/<scans> and query/<cases>.")],
    out: Annotated[Optional[Path], typer.Option(help="Report folder, created whole when the batch is done [default: CASES/medmeta-report].")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing non-empty --out folder (only once the new reports are complete).")] = False,
    labels: Annotated[Optional[Path], typer.Option(help="CSV path,label (paths relative to CASES) to score the batch.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    stability: Annotated[bool, typer.Option(help="Leave-one-out stability per case (one refit per support scan; needs 2+ scans per condition).")] = True,
    conformal_source: Annotated[str, typer.Option(help="Threshold of the prediction sets: val (fitted on validation conditions, in the checkpoint), support (fitted on this support's leave-one-out predictions; 2+ scans per condition, else mass with a note) or mass (the most probable conditions up to the target coverage of the calibrated probability).")] = DEFAULT_SOURCE,
    temperature_source: Annotated[str, typer.Option(help="Temperature of the probabilities: val (the checkpoint's, fitted on validation conditions) or support (the checkpoint's updated by the support's leave-one-out predictions; 2+ scans per condition, else val with a note).")] = DEFAULT_SOURCE,
    temperature_sigma: Annotated[float, typer.Option(help="Prior spread (standard deviation of log T) of the support-updated temperature; 0 keeps the checkpoint's.")] = TEMPERATURE_PRIOR_SIGMA,
    max_pixels: Annotated[int, typer.Option(min=1, help="Reject, without decoding it, a scan whose header declares more pixels than this (rows x columns x frames x channels), or whose file (a deflated DICOM: once inflated) holds more than 8 bytes per pixel of it plus 64 MiB.")] = MAX_PIXELS,
    allow_unfinished: Annotated[bool, typer.Option(help="Use a checkpoint whose training stopped before calibration (uncalibrated probabilities).")] = False,
    head: Annotated[Optional[str], typer.Option(help="What is fitted on the support: method (the trained method's own adaptation), prototype (nearest class mean) or logistic (logistic regression) on normalised embeddings, or finetune (the backbone's last block and a classifier fine-tuned on the support) [default: the checkpoint's, chosen on val classes].")] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Processes that read the cases in parallel (0: in this process) [default: one per core, at most 8].")] = None,
    chunk_cases: Annotated[Optional[int], typer.Option(min=1, help="Cases diagnosed together; memory holds one chunk whatever the batch size [default: 64 MiB of pixels, at most 512].")] = None,
    transductive: Annotated[Optional[str], typer.Option(help="Refine an embedding head's predictions with the whole batch of cases: soft_kmeans (robust to an imbalanced batch), alpha_tim, or bd_cspn / tim_gd (these assume a balanced batch). Needs a calibration for it in the checkpoint: training stores prototype+soft_kmeans; `medmeta calibrate --head prototype+alpha_tim` adds others.")] = None,
    pdf: Annotated[bool, typer.Option(help="Also print report.html to report.pdf (needs headless Chromium: apt install chromium).")] = False,
    dicom_sr: Annotated[bool, typer.Option(help="Also write one DICOM Structured Report per case into sr/ (TID 1500: predicted condition, probabilities, prediction set, referral), referencing the source image when the case is DICOM.")] = False,
    allow_dicom: Annotated[Optional[list[str]], typer.Option(help="An identifying DICOM attribute (keyword, e.g. PatientID) that may appear in the outputs; repeat, or separate with commas. None by default (docs/privacy.md). An allowed PatientID also groups the cases by patient.")] = None,
    deidentify: Annotated[bool, typer.Option(help="Replace file, folder and patient names and the reference UIDs in every output with salted hashes (DICOM PS3.15 Annex E in spirit).")] = False,
    salt_file: Annotated[Optional[Path], typer.Option(help="With --deidentify: a file whose bytes are the secret salt, to get the same pseudonyms across runs [default: a random salt, never written].")] = None,
    saliency: Annotated[bool, typer.Option(help="Show what drove each prediction: an occlusion saliency overlay per case (about 50 more backbone passes per 2D case; --no-saliency for speed).")] = True,
) -> None:
    """Adapt to the support scans in CASES and write predictions.csv, report.json, report.html (thumbnails/ beside it), rejected.csv (and report.pdf with --pdf, sr/ with --dicom-sr)."""
    out_dir = out or cases / "medmeta-report"
    with user_errors():
        from medmeta.privacy import PrivacyPolicy

        policy = PrivacyPolicy.from_options(allow_dicom or (), deidentify, salt_file)
        check_choice(conformal_source, CONFORMAL_SOURCES, "--conformal-source")
        check_temperature_options(temperature_source, temperature_sigma)
        if head is not None:
            check_choice(head, HEAD_NAMES, "--head")
        if transductive is not None:
            check_choice(transductive, TRANSDUCTIVE_NAMES, "--transductive")
        from medmeta.errors import CasesError, MedmetaError
        from medmeta.output_folder import OutputFolder

        try:
            if not cases.is_dir():  # before the default --out inside it is claimed
                raise CasesError(f"{cases}: cases folder not found")
            if pdf:  # before any work: a missing browser is said in a second, not after the batch
                from medmeta.reports.pdf import require_browser

                require_browser()
            with OutputFolder(out_dir, overwrite) as folder:  # checked and locked before any work
                result = _run(checkpoint, cases, labels, device, folder, stability=stability, conformal_source=conformal_source,
                              temperature_source=temperature_source, prior_sigma=temperature_sigma, max_pixels=max_pixels,
                              allow_unfinished=allow_unfinished, head=head, transductive=transductive, workers=workers,
                              chunk_cases=chunk_cases, pdf=pdf, saliency=saliency, policy=policy, dicom_sr=dicom_sr)
        except MedmetaError as exc:  # an error names no file or folder that --deidentify hides
            exc.args = (policy.text(str(exc), {}, cases),)
            raise
    _print_summary(result, policy.text(str(out_dir), {}, cases))


def _run(checkpoint: Path, cases: Path, labels: Optional[Path], device: str, folder, policy, pdf: bool = False,
         dicom_sr: bool = False, **options):
    """Adapt and write the reports into the claimed folder's temporary twin: thumbnails as the
    cases are diagnosed, the other files at the end; it replaces ``--out`` only when complete.
    Returns the batch as the outputs name it (``policy``: :mod:`medmeta.privacy`)."""
    from medmeta.adaptation import adapt as run_adapt
    from medmeta.errors import CasesError
    from medmeta.reports import write_batch_outputs

    try:
        with folder.writing() as tmp:
            result = run_adapt(checkpoint, cases, labels=labels, device=device, thumbnail_dir=tmp / "thumbnails", **options)
            return write_batch_outputs(result, tmp, cases, policy, dicom_sr=dicom_sr, pdf=pdf)
    except CasesError as exc:
        names = {path: policy.path(path) for path, _ in exc.rejected}
        scrub = policy.scrubber(names, cases)
        exc.rejected = [(names[path], scrub(reason)) for path, reason in exc.rejected]
        exc.args = (scrub(str(exc)),)  # what user_errors prints
        shown = policy.text(str(folder.path), {}, cases)
        for path, reason in exc.rejected:
            warn(f"{path}: {reason}", "rejected")
        if folder.has_results():
            warn(f"the reports already in {shown} were left untouched", "note")
        elif exc.rejected:  # a new folder: keep the list of unreadable files for the user
            from medmeta.reports import write_rejected

            with folder.writing() as tmp:
                write_rejected(tmp, exc.rejected)
            warn(f"{len(exc.rejected)} unreadable file(s) listed in {shown}/rejected.csv", "note")
        raise


def _print_summary(result, out_dir: str) -> None:
    from medmeta.progress import console

    for path, reason in result.rejected:
        warn(f"{path}: {reason}", "rejected")
    summary = f"Diagnosed {len(result.cases)} case(s) among {len(result.conditions)} conditions"
    if result.metadata.get("referral") is not None:
        summary += f", {sum(case.refer for case in result.cases)} referred for review"
    if result.metrics and "accuracy" in result.metrics:
        summary += f"; accuracy {result.metrics['accuracy']:.3f}, ECE {result.metrics['ece']:.3f} on {result.metrics['n_labelled']} labelled"
    console.print(summary + f". Reports in {out_dir}/", highlight=False, markup=False)
    if result.metrics and result.metrics.get("unknown_labels"):
        warn(
            f"label(s) that name no condition of the support (not scored): "
            f"{', '.join(result.metrics['unknown_labels'])}; the conditions are {', '.join(result.conditions)}"
        )
    if result.unmatched_labels:
        shown = ", ".join(result.unmatched_labels[:5]) + (" ..." if len(result.unmatched_labels) > 5 else "")
        warn(f"{len(result.unmatched_labels)} path(s) in the labels CSV match no case: {shown}")
    for note in result.metadata.get("notes", []):
        warn(note, "note")
