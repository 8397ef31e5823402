"""Model selection: seeded val-class episodes score the model; the best is saved as the
checkpoint (``best.safetensors`` + ``best.json``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medmeta.checkpoint import save_checkpoint
from medmeta.evaluation import run_episodes, summarize
from medmeta.progress import console
from medmeta.training.bars import episode_bar
from medmeta.training.build import backbone_kwargs

if TYPE_CHECKING:
    from medmeta.training.loop import Run


def validate(run: "Run", label: str) -> None:
    """Score the model on ``val_episodes`` val-class episodes (the same ones every time), add
    the result to the history and save the checkpoint when it is the best so far. When the run
    keeps a moving average of its weights (``ema_decay``), the average is scored the same way
    and is a candidate of its own (history entries say ``"weights": "average"``). With several
    training processes, process 0 validates and the others wait for it."""
    from medmeta.training.distributed import barrier

    if not run.processes.is_main:
        barrier(run.processes)
        return
    cfg = run.config
    scores = [_score(run, label, "current")]
    if run.has_average:
        with run.averaged_weights():
            scores.append(_score(run, label, "average"))
    if not run.quiet:
        shown = "; weight average ".join(scores)
        console.print(f"Validation {label}: accuracy {shown} ({cfg.val_episodes} {run.val_way}-way {run.shot}-shot episodes on val classes)")
    barrier(run.processes)


def _score(run: "Run", label: str, weights: str) -> str:
    """Validate the learner's weights as they are now (``weights`` names them in the history),
    keep them as the checkpoint when they are the best so far; returns the figure in words."""
    cfg = run.config
    with run.checkpoint_layout(), episode_bar("Validating", cfg.val_episodes, quiet=run.quiet, within=run.progress) as on_episode:
        outputs = run_episodes(run.learner, run.store, run.val_sampler, range(cfg.val_episodes), run.device, on_episode=on_episode)
    stats = summarize(outputs).to_dict()
    # no prediction sets or referral during model selection: leave their (None) entries out
    entry = {"phase": run.phase, "epoch": run.epoch, "episode": run.episode, **({"weights": weights} if weights != "current" else {}),
             **{k: v for k, v in stats.items() if v is not None}}
    run.history.append(entry)
    improved = stats["accuracy"] > run.best_val["accuracy"]
    if improved:
        run.best_val = {"accuracy": stats["accuracy"], "accuracy_ci95": stats["accuracy_ci95"], "episode": run.episode, "phase": run.phase,
                        **({"weights": weights} if weights != "current" else {})}
        save_checkpoint(run.out / "best.json", run.learner, checkpoint_meta(run))
        run.best_outputs = outputs  # the calibration's held-out check of this model, already run
    return f"{stats['accuracy']:.3f} ± {stats['accuracy_ci95']:.3f}" + (" [green](best, saved)[/]" if improved else "")


def checkpoint_meta(run: "Run") -> dict[str, Any]:
    """The sidecar of the checkpoint as it stands (calibration still the uncalibrated record)."""
    from medmeta.calibration import CalibrationRecord

    cfg = run.config
    return {
        "method": {"name": cfg.method, "hparams": run.learner.hparams()},
        "backbone": {"name": cfg.backbone, "kwargs": backbone_kwargs(cfg)},
        "preprocessing": run.preprocessing.to_dict(),
        "protocol": run.protocol.to_dict(),
        "training": {
            "config": cfg.to_dict(),
            "episode_shape": {"way": run.way, "shot": run.shot, "query": run.query, "train_shots": run.train_shots},
            "phase": run.phase,
            "pretrain_epochs_done": run.epoch,
            "episodes_done": run.episode,
            "best_val": run.best_val,
            "history": run.history,
            "device": str(run.device),
            "precision": run.precision,
            "processes": run.processes.world_size,
        },
        "calibration": CalibrationRecord().to_dict(),
    }
