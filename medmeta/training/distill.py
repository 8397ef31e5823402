"""Self-distillation of the pre-trained backbone: born-again generations (Furlanello et al.
2018, "Born-Again Neural Networks"; for few-shot transfer, Tian et al. 2020, "Rethinking
Few-Shot Image Classification: a Good Embedding Is All You Need?", where one generation of
self-distillation adds one to two points).

Generation 0 is ordinary pre-training. Each later generation starts a fresh backbone and
classifier (seeded by the generation) and trains them, with the same epochs and schedule,
against a mix of the labels and the previous generation's softened predictions on the same
augmented images. The end of every generation is validated, so model selection on val classes
decides whether distillation is kept."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from medmeta.training.loop import Run

#: Temperature of the softened predictions.
DISTILL_TEMPERATURE = 4.0
#: Weight of the distillation term; the label cross-entropy gets the rest.
DISTILL_WEIGHT = 0.5
#: Generation g > 0 draws its initial weights from the seed ``seed + g * GENERATION_SEED_OFFSET``.
GENERATION_SEED_OFFSET = 7919


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = DISTILL_TEMPERATURE) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over the batch, for
    logits ``(n, n_classes)``; the ``T^2`` keeps its gradients on the scale of the cross-entropy."""
    t = float(temperature)
    student = F.log_softmax(student_logits / t, dim=1)
    teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


def generation_seed(seed: int, generation: int) -> int:
    return int(seed) + int(generation) * GENERATION_SEED_OFFSET


def frozen_teacher(run: "Run") -> nn.Module:
    """A frozen copy of the current backbone and classifier, in evaluation mode."""
    teacher = copy.deepcopy(nn.ModuleDict({"backbone": run.learner.backbone, "head": run.head})).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def teacher_logits(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return teacher["head"](teacher["backbone"](images))


def fresh_backbone_weights(run: "Run", generation: int) -> dict[str, torch.Tensor]:
    """The initial backbone weights of ``generation``: a newly built learner's, drawn from the
    generation's seed without touching torch's global random state."""
    from medmeta.training.build import build_learner

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generation_seed(run.config.seed, generation))
        return build_learner(run.config).backbone.state_dict()


def begin_generation(run: "Run", generation: int) -> None:
    """Freeze the model as the teacher, restart the student from fresh weights, and give it a
    new classifier, optimiser and cosine schedule."""
    from medmeta.training.pretrain import start_pretraining

    run.teacher = frozen_teacher(run)
    run.learner.backbone.load_state_dict(fresh_backbone_weights(run, generation))
    run.generation = generation
    start_pretraining(run)
