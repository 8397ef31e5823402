"""``medmeta adapt``: adapt to labelled support scans and diagnose the unlabelled cases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medmeta.cli.common import check_choice, check_temperature_options, user_errors
from medmeta.calibration import CONFORMAL_SOURCES, TEMPERATURE_PRIOR_SIGMA
from medmeta.adapt import adapt as run_adapt
from medmeta.errors import CasesError
from medmeta.progress import console
from medmeta.reports import write_rejected, write_reports


def adapt(
    checkpoint: Annotated[Path, typer.Option(help="Run folder, NAME.json or NAME.safetensors from `medmeta train`.")],
    cases: Annotated[Path, typer.Option(help="Folder with support/<condition>/<scans> and query/<cases>.")],
    out: Annotated[Optional[Path], typer.Option(help="Report folder [default: CASES/medmeta-report].")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="CSV path,label (paths relative to CASES) to score the batch.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    stability: Annotated[bool, typer.Option(help="Leave-one-out stability per case (one refit per support scan; needs 2+ scans per condition).")] = True,
    conformal_source: Annotated[str, typer.Option(help="Threshold of the prediction sets: val (fitted on validation conditions, in the checkpoint) or support (fitted on this support's leave-one-out predictions; 2+ scans per condition).")] = "val",
    temperature_source: Annotated[str, typer.Option(help="Temperature of the probabilities: val (the checkpoint's, fitted on validation conditions) or support (the checkpoint's updated by the support's leave-one-out predictions; 2+ scans per condition).")] = "val",
    temperature_sigma: Annotated[float, typer.Option(help="Prior spread (standard deviation of log T) of the support-updated temperature; 0 keeps the checkpoint's.")] = TEMPERATURE_PRIOR_SIGMA,
) -> None:
    """Adapt to the support scans in CASES and write predictions.csv, report.json, report.html, rejected.csv."""
    out_dir = out or cases / "medmeta-report"
    with user_errors():
        check_choice(conformal_source, CONFORMAL_SOURCES, "--conformal-source")
        check_temperature_options(temperature_source, temperature_sigma)
        try:
            result = run_adapt(
                checkpoint, cases, labels=labels, device=device, stability=stability, conformal_source=conformal_source,
                temperature_source=temperature_source, prior_sigma=temperature_sigma,
            )
        except CasesError as exc:
            if exc.rejected:
                write_rejected(out_dir, exc.rejected)
                console.print(f"{len(exc.rejected)} unreadable file(s) listed in {out_dir / 'rejected.csv'}")
            raise
        write_reports(result, out_dir)
    for path, reason in result.rejected:
        console.print(f"[yellow]rejected[/] {path}: {reason}", highlight=False)
    summary = f"Diagnosed {len(result.cases)} case(s) among {len(result.conditions)} conditions"
    if result.metadata.get("referral") is not None:
        summary += f", {sum(case.refer for case in result.cases)} referred for review"
    if result.metrics and "accuracy" in result.metrics:
        summary += f"; accuracy {result.metrics['accuracy']:.3f}, ECE {result.metrics['ece']:.3f} on {result.metrics['n_labelled']} labelled"
    console.print(summary + f". Reports in {out_dir}/", highlight=False)
    for note in result.metadata.get("notes", []):
        console.print(f"[yellow]note[/] {note}", highlight=False)
