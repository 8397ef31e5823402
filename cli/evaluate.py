"""``medmeta evaluate``: measure a checkpoint on held-out (test) conditions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import user_errors
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
    out: Annotated[Optional[Path], typer.Option(help="Folder for the results JSON and the episodes' file lists (CSV).")] = None,
) -> None:
    """Accuracy (95% CI), macro AUC, ECE/NLL/Brier before and after temperature scaling on test classes."""
    with user_errors():
        result = evaluate_checkpoint(checkpoint, protocol, way, shot, query, episodes, seed, device, out_dir=out)
    console.print(
        f"{result['method']} on {result['protocol']} test classes, {result['episodes']} {result['way']}-way "
        f"{result['shot']}-shot episodes: accuracy {100 * result['accuracy']:.1f}% ± {100 * result['accuracy_ci95']:.1f}, "
        f"macro AUC {result['macro_auc']:.3f}, ECE {result['ece_before']:.3f} -> {result['ece_after']:.3f} "
        f"(T = {result['temperature']:.3f}), NLL {result['nll_before']:.3f} -> {result['nll_after']:.3f}",
        highlight=False,
    )
