"""Choosing the fine-tuning head's steps and learning rate on val episodes, at training time."""

from __future__ import annotations

from typing import Any

import numpy as np

from medmeta.heads.finetune import LR_GRID, STEPS_GRID, FinetuneHead
from medmeta.progress import console
from medmeta.training.bars import episode_bar

#: Keeps the tuning episodes apart from model selection's and calibration's (same val classes).
TUNING_SEED_OFFSET = 3_000_017


def tuning_sampler(sampler):
    """Episodes of ``sampler``'s classes and shape, on a seed of their own."""
    from medmeta.data import EpisodeSampler

    return EpisodeSampler(sampler.records_by_class, sampler.way, sampler.shot, sampler.query, sampler.seed + TUNING_SEED_OFFSET)


def tune_finetune(learner, normaliser, store, sampler, n_episodes: int, device, quiet: bool = False,
                  steps_grid: tuple[int, ...] = STEPS_GRID, lr_grid: tuple[float, ...] = LR_GRID,
                  base: FinetuneHead | None = None) -> tuple[FinetuneHead, dict[str, Any]]:
    """Score every ``(steps, lr)`` of the grid by query accuracy on ``n_episodes`` episodes of
    ``sampler`` (val classes; one fine-tuning run per episode and rate gives every step count)
    and return the head with the best pair (ties: fewer steps, then the smaller rate) and the
    evidence: the grid's accuracies. ``base`` gives the other hyperparameters."""
    from medmeta.evaluation import episode_task

    base = base or FinetuneHead()
    correct = {(s, lr): 0 for s in steps_grid for lr in lr_grid}
    total = 0
    was_training = learner.training
    learner.eval()
    try:
        with episode_bar("Tuning the finetune head", n_episodes, quiet) as on_episode:
            for index in range(n_episodes):
                task = episode_task(store, sampler, index)
                support, labels = task.support_images.to(device), task.support_labels.to(device)
                query, truth = task.query_images.to(device), task.query_labels
                shared: dict = {}  # the frozen part's outputs, computed once for every rate
                for lr in lr_grid:
                    adapted = FinetuneHead(**{**base.hparams(), "lr": lr}).learner(learner, normaliser, cache=shared)
                    for steps, logits in adapted.trajectory(support, labels, query, tuple(steps_grid), lr).items():
                        correct[(steps, lr)] += int((logits.argmax(1).cpu() == truth).sum())
                total += len(truth)
                on_episode(None)
    finally:
        learner.train(was_training)
    accuracy = {key: value / max(1, total) for key, value in correct.items()}
    best = max(sorted(accuracy), key=lambda key: (round(accuracy[key], 12), -key[0], -key[1]))
    head = FinetuneHead(**{**base.hparams(), "steps": best[0], "lr": best[1]})
    evidence = {
        "episodes": n_episodes,
        "way": sampler.way,
        "shot": sampler.shot,
        "grid": [{"steps": s, "lr": lr, "accuracy": accuracy[(s, lr)]} for (s, lr) in sorted(accuracy)],
        "chosen": {"steps": best[0], "lr": best[1], "accuracy": accuracy[best]},
    }
    if not quiet:
        untuned = max(accuracy[(0, lr)] for lr in lr_grid) if 0 in steps_grid else float("nan")
        console.print(
            f"Finetune head: {best[0]} steps at lr {best[1]:g} ({accuracy[best]:.3f} on {n_episodes} val episodes; "
            f"0 steps {untuned:.3f})",
            highlight=False,
        )
    return head, evidence


def grid_accuracy(evidence: dict[str, Any]) -> np.ndarray:
    """The evidence's grid as a ``(len(steps), len(lr))`` array (for reports and tests)."""
    steps = sorted({g["steps"] for g in evidence["grid"]})
    rates = sorted({g["lr"] for g in evidence["grid"]})
    out = np.full((len(steps), len(rates)), np.nan)
    for g in evidence["grid"]:
        out[steps.index(g["steps"]), rates.index(g["lr"])] = g["accuracy"]
    return out

