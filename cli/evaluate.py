"""``medmeta evaluate``: measure a checkpoint on held-out (test) conditions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medmeta.cli.common import check_choice, check_temperature_options, user_errors
from medmeta.calibration import CONFORMAL_SOURCES, TEMPERATURE_PRIOR_SIGMA
from medmeta.evaluation import evaluate_checkpoint
from medmeta.progress import console


def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Run folder, NAME.json or NAME.safetensors.")],
    protocol: Annotated[Optional[Path], typer.Option(help="Protocol YAML [default: the checkpoint's].")] = None,
    way: Annotated[Optional[int], typer.Option(help="Classes per episode [default: protocol's].")] = None,
    shot: Annotated[Optional[int], typer.Option(help="Support scans per class [default: protocol's smallest].")] = None,
    query: Annotated[Optional[int], typer.Option(help="Query scans per class [default: protocol's].")] = None,
    episodes: Annotated[Optional[int], typer.Option(help="Test episodes [default: protocol's test_episodes].")] = None,
    seed: Annotated[int, typer.Option(help="Episode seed (same seed, same episodes for every model).")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Folder for the results JSON, reliability and risk-coverage PNGs and the episodes' file lists (CSV).")] = None,
    conformal_source: Annotated[str, typer.Option(help="Threshold of the prediction sets: val (the checkpoint's, fitted on validation conditions) or support (fitted per episode on the support's leave-one-out predictions; 2+ shots).")] = "val",
    temperature_source: Annotated[str, typer.Option(help="Temperature of the probabilities: val (the checkpoint's, fitted on validation conditions) or support (the checkpoint's updated by the support's leave-one-out predictions; 2+ scans per condition).")] = "val",
    temperature_sigma: Annotated[float, typer.Option(help="Prior spread (standard deviation of log T) of the support-updated temperature; 0 keeps the checkpoint's.")] = TEMPERATURE_PRIOR_SIGMA,
) -> None:
    """Accuracy (95% CI), macro AUC, ECE/MCE/NLL/Brier before and after temperature scaling, per-class
    recall, conformal coverage and set size, referral and risk-coverage (AURC) on test classes."""
    with user_errors():
        check_choice(conformal_source, CONFORMAL_SOURCES, "--conformal-source")
        check_temperature_options(temperature_source, temperature_sigma)
        result = evaluate_checkpoint(
            checkpoint, protocol, way, shot, query, episodes, seed, device, out_dir=out, conformal_source=conformal_source,
            temperature_source=temperature_source, prior_sigma=temperature_sigma,
        )
    console.print(
        f"{result['method']} on {result['protocol']} test classes, {result['episodes']} {result['way']}-way "
        f"{result['shot']}-shot episodes: accuracy {100 * result['accuracy']:.1f}% ± {100 * result['accuracy_ci95']:.1f}, "
        f"macro AUC {result['macro_auc']:.3f}, ECE {result['ece_before']:.3f} -> {result['ece_after']:.3f} "
        f"({_temperature(result)}), NLL {result['nll_before']:.3f} -> {result['nll_after']:.3f}",
        highlight=False,
    )
    line = f"MCE {result['mce_before']:.3f} -> {result['mce_after']:.3f}, AURC {result['aurc']:.3f}"
    if result["coverage"] is not None:
        line += (
            f"; prediction sets ({result['conformal_source']}-calibrated): coverage {100 * result['coverage']:.1f}% "
            f"(target {100 * result['coverage_target']:.0f}%), "
            f"mean size {result['mean_set_size']:.2f}"
        )
    if result["referral_rate"] is not None:
        line += (
            f"; referred {100 * result['referral_rate']:.1f}%, accuracy of the others "
            f"{100 * result['accuracy_not_referred']:.1f}%"
        )
    console.print(line, highlight=False)
    if result["per_class_recall"]:
        recalls = ", ".join(f"{name} {100 * r:.1f}%" for name, r in result["per_class_recall"].items())
        console.print(f"Recall per class: {recalls}", highlight=False)
    for note in result["notes"]:
        console.print(f"[yellow]note[/] {note}", highlight=False)


def _temperature(result: dict) -> str:
    if result["temperature_source"] == "support":
        return f"val T = {result['temperature']:.3f} updated by each support, mean {result['support_temperature_mean']:.3f}"
    return f"T = {result['temperature']:.3f}"
