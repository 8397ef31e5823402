"""``medmeta calibrate``: refit a checkpoint's calibration on its val classes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medmeta.cli.common import user_errors
from medmeta.training.config_file import parse_key_values


def calibrate(
    checkpoint: Annotated[Path, typer.Option(help="Run folder, NAME.json or NAME.safetensors.")],
    shot: Annotated[Optional[int], typer.Option(help="Support scans per class in the calibration episodes [default: training's].")] = None,
    coverage: Annotated[Optional[float], typer.Option(help="Target coverage of the prediction sets, e.g. 0.9 [default: the checkpoint's].")] = None,
    conformal_score: Annotated[Optional[str], typer.Option(help="Conformal score: lac or aps [default: the checkpoint's].")] = None,
    class_conditional: Annotated[Optional[bool], typer.Option("--class-conditional/--marginal", help="Mondrian calibration over val classes [default: the checkpoint's].")] = None,
    refer_share: Annotated[Optional[float], typer.Option(help="Share of in-distribution val cases to flag as far from the support [default: the checkpoint's].")] = None,
    episodes: Annotated[Optional[int], typer.Option(help="Calibration episodes [default: training's].")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    method_option: Annotated[Optional[list[str]], typer.Option(help="Method hyperparameter KEY=VALUE that leaves the weights as they are (repeatable), e.g. distance=euclidean for protonet [default: none].")] = None,
    head: Annotated[Optional[list[str]], typer.Option(help="Refit only this head, HEAD or HEAD+REFINER (repeatable), e.g. prototype+alpha_tim to use `adapt --head prototype --transductive alpha_tim`; `method` is the method's own. Other heads keep their calibration [default: the method's and every head training calibrates].")] = None,
) -> None:
    """Refit temperature, conformal threshold and referral threshold on val-class episodes (and a temperature for each other protocol shot); weights are untouched."""
    with user_errors():
        from medmeta.progress import console
        from medmeta.training.calibration import print_calibration, recalibrate

        record = recalibrate(
            checkpoint, shot=shot, coverage=coverage, conformal_score=conformal_score,
            class_conditional=class_conditional, refer_share=refer_share, calibration_episodes=episodes, device=device,
            quiet=console.quiet, method_options=parse_key_values(method_option or [], "--method-option"), heads=head,
        )
    print_calibration(record)
