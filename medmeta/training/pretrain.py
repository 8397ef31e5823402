"""Phase 1: the backbone pre-trained as an ordinary classifier over all meta-train classes
(a linear head on the pooled features, cross-entropy with optional label smoothing, SGD with
Nesterov momentum, cosine schedule), optionally with a self-supervised contrastive loss on a
second augmented view of each image (:mod:`medmeta.training.contrastive`); the heads are
discarded afterwards."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from medmeta.data.loading import PretrainImages, PretrainOrder, make_loader
from medmeta.progress import make_progress
from medmeta.training.distributed import PretrainForward, wrap
from medmeta.training.contrastive import ProjectionHead, nt_xent
from medmeta.training.distill import (
    DISTILL_WEIGHT,
    begin_generation,
    distillation_loss,
    frozen_teacher,
    generation_seed,
    teacher_logits,
)

#: The second view's augmentation seeds are the first's plus this (below the next epoch's).
CONTRASTIVE_VIEW_OFFSET = 500_000

if TYPE_CHECKING:
    from medmeta.training.loop import Run


def start_pretraining(run: "Run") -> None:
    """A fresh head (seeded; a self-distillation generation by its own seed), its SGD optimiser
    over backbone + head, and the cosine schedule; in a later generation, the place of the
    frozen teacher (filled by :func:`~medmeta.training.distill.begin_generation` or by resume)."""
    cfg = run.config
    n_classes = len(run.protocol.classes["train"])
    torch.manual_seed(generation_seed(cfg.seed, run.generation) if run.generation else cfg.seed)
    run.head = nn.Linear(run.learner.backbone.num_features, n_classes).to(run.device)
    params = list(run.learner.backbone.parameters()) + list(run.head.parameters())
    if cfg.pretrain_contrastive > 0:
        run.projection = ProjectionHead(run.learner.backbone.num_features).to(run.device)
        params += list(run.projection.parameters())
    if run.generation and run.teacher is None:  # resumed in a later generation: loaded next
        run.teacher = frozen_teacher(run)
    run.optimizer = torch.optim.SGD(params, lr=cfg.pretrain_lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    run.step_module = wrap(PretrainForward(run.learner.backbone, run.head, run.projection), run.processes, run.device)
    run.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(run.optimizer, T_max=max(1, cfg.pretrain_epochs))


def pretrain(run: "Run") -> None:
    """Pre-train from ``run.epoch`` to ``pretrain_epochs`` times ``pretrain_generations``
    (saving the resume state after every epoch), validating the end of every generation as a
    model-selection candidate."""
    from medmeta.training.resume import save_state
    from medmeta.training.selection import validate

    cfg = run.config
    total_epochs = cfg.pretrain_epochs * cfg.pretrain_generations
    names = run.protocol.classes["train"]
    records = [r for i, n in enumerate(names) for r in run.protocol.records[n]]
    labels = torch.tensor([i for i, n in enumerate(names) for _ in run.protocol.records[n]])
    n_batches = max(1, len(records) // cfg.pretrain_batch_size)
    run.learner.train()
    assert run.head is not None and run.optimizer is not None
    dataset = PretrainImages(
        records, labels, run.store, run.augment, cfg.seed, cfg.pretrain_batch_size, run.processes.rank, run.processes.world_size,
        second_view_offset=CONTRASTIVE_VIEW_OFFSET if cfg.pretrain_contrastive > 0 else None,
    )
    batches = iter(make_loader(dataset, PretrainOrder(run.epoch, total_epochs, n_batches), run.workers, cfg.seed))
    with make_progress(disable=run.quiet) as progress:
        task = progress.add_task("Pre-training", total=total_epochs * n_batches, completed=run.epoch * n_batches, status="")
        while run.epoch < total_epochs:
            generation = run.epoch // cfg.pretrain_epochs
            if generation > run.generation:  # the previous generation is a candidate, then the teacher
                validate(run, label=f"after pre-training generation {run.generation + 1}")
                begin_generation(run, generation)
                run.learner.train()
            started = time.perf_counter()
            _epoch(run, batches, n_batches, lambda status: progress.update(task, advance=1, status=status))
            run.scheduler.step()
            run.train_seconds += time.perf_counter() - started
            run.epoch += 1
            save_state(run)
    validate(run, label="after pre-training" + (f" generation {run.generation + 1}" if cfg.pretrain_generations > 1 else ""))


def _epoch(run: "Run", batches, n_batches: int, report) -> None:
    """One pass over the train images in the seeded order of epoch ``run.epoch``, its
    :class:`~medmeta.data.loading.PretrainBatch` items taken from the iterator ``batches``."""
    correct = seen = 0
    for b in range(n_batches):
        item = next(batches)
        assert (item.epoch, item.batch) == (run.epoch, b), f"the loader gave batch {item.batch} of epoch {item.epoch + 1}"
        images = run.batch_to_device(item.images)
        target = item.targets.to(run.device)
        n = len(target)
        batch_views = images if item.second is None else torch.cat([images, run.batch_to_device(item.second)])
        with run.autocast():
            logits, z = run.step_module(batch_views, n)
            loss = F.cross_entropy(logits, target, label_smoothing=run.config.pretrain_label_smoothing)
            if run.teacher is not None:
                soft = distillation_loss(logits, teacher_logits(run.teacher, images))
                loss = (1 - DISTILL_WEIGHT) * loss + DISTILL_WEIGHT * soft
            if z is not None:
                loss = loss + run.config.pretrain_contrastive * nt_xent(z[:n], z[n:])
        run.optimizer.zero_grad(set_to_none=True)
        run.optimiser_step(loss)
        correct += int((logits.argmax(1) == target).sum())
        seen += n
        report(f"epoch {run.epoch + 1} loss {loss.item():.3f} acc {correct / seen:.3f}")
