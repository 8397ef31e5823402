"""``medmeta evaluate``: measure a checkpoint on held-out (test) conditions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medmeta.cli.adapt import CONFORMAL_SOURCES, DEFAULT_SOURCE, HEAD_NAMES, TEMPERATURE_PRIOR_SIGMA, TRANSDUCTIVE_NAMES
from medmeta.cli.common import check_choice, check_temperature_options, user_errors, warn


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
    conformal_source: Annotated[str, typer.Option(help="Threshold of the prediction sets: val (the checkpoint's, fitted on validation conditions), support (fitted per episode on the support's leave-one-out predictions; 2+ shots, else mass with a note) or mass (the most probable classes up to the target coverage of the calibrated probability).")] = DEFAULT_SOURCE,
    temperature_source: Annotated[str, typer.Option(help="Temperature of the probabilities: val (the checkpoint's, fitted on validation conditions) or support (the checkpoint's updated by the support's leave-one-out predictions; 2+ scans per condition, else val with a note).")] = DEFAULT_SOURCE,
    temperature_sigma: Annotated[float, typer.Option(help="Prior spread (standard deviation of log T) of the support-updated temperature; 0 keeps the checkpoint's.")] = TEMPERATURE_PRIOR_SIGMA,
    allow_unfinished: Annotated[bool, typer.Option(help="Measure a checkpoint whose training stopped before calibration.")] = False,
    head: Annotated[Optional[str], typer.Option(help="What is fitted on each support: method, prototype, logistic or finetune (see `medmeta adapt --help`) [default: the checkpoint's].")] = None,
    transductive: Annotated[Optional[str], typer.Option(help="Refine an embedding head's predictions with each episode's whole query batch (see `medmeta adapt --help`).")] = None,
) -> None:
    """Accuracy (95% CI), macro AUC, ECE/MCE/NLL/Brier before and after temperature scaling, per-class
    recall, conformal coverage and set size, referral and risk-coverage (AURC) on test classes."""
    with user_errors():
        check_choice(conformal_source, CONFORMAL_SOURCES, "--conformal-source")
        check_temperature_options(temperature_source, temperature_sigma)
        if head is not None:
            check_choice(head, HEAD_NAMES, "--head")
        if transductive is not None:
            check_choice(transductive, TRANSDUCTIVE_NAMES, "--transductive")
        from medmeta.evaluation import EvaluationSettings, evaluate_checkpoint
        from medmeta.progress import is_quiet

        settings = EvaluationSettings(
            protocol, way, shot, query, episodes, seed, conformal_source, temperature_source, temperature_sigma, head, transductive
        )
        result = evaluate_checkpoint(checkpoint, settings, device, out_dir=out, quiet=is_quiet(), allow_unfinished=allow_unfinished)
    _print_result(result)


def _print_result(result) -> None:
    from medmeta.progress import console

    s, m = result.settings, result.summary
    console.print(
        f"{result.method} ({s.head} head{', ' + s.transductive + ' transductive' if s.transductive else ''}) on {result.protocol} test classes, {m.episodes} {s.way}-way "
        f"{s.shot}-shot episodes: accuracy {100 * m.accuracy:.1f}% ± {100 * m.accuracy_ci95:.1f}, "
        f"macro AUC {m.macro_auc:.3f}, ECE {m.ece_before:.3f} -> {m.ece_after:.3f} "
        f"({_temperature(m)}), NLL {m.nll_before:.3f} -> {m.nll_after:.3f}",
        highlight=False, markup=False,
    )
    line = f"MCE {m.mce_before:.3f} -> {m.mce_after:.3f}, AURC {m.aurc:.3f}"
    if m.coverage is not None:
        line += (
            f"; prediction sets ({m.conformal_source}-calibrated): coverage {100 * m.coverage:.1f}% "
            f"(target {100 * m.coverage_target:.0f}%), mean size {m.mean_set_size:.2f}"
        )
    if m.referral_rate is not None:
        line += f"; referred {100 * m.referral_rate:.1f}%, accuracy of the others {100 * m.accuracy_not_referred:.1f}%"
    console.print(line, highlight=False, markup=False)
    if m.per_class_recall:
        recalls = ", ".join(f"{name} {100 * r:.1f}%" for name, r in m.per_class_recall.items())
        console.print(f"Recall per class: {recalls}", highlight=False, markup=False)
    for note in result.notes:
        warn(note, "note")
    for warning in result.warnings:
        warn(warning)


def _temperature(summary) -> str:
    if summary.temperature_source == "support":
        return f"val T = {summary.temperature:.3f} updated by each support, mean {summary.support_temperature_mean:.3f}"
    return f"T = {summary.temperature:.3f}"
