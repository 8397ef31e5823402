"""Head fit on the support -> logits: the learner's own adaptation, plus leave-one-out refits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medmeta.embedded import OnEmbeddings, adapts_on_embeddings
from medmeta.leave_one_out import leave_one_out
from medmeta.pipeline.saliency import OcclusionScores, occlusion_logits
from medmeta.pipeline.task import Task


@dataclass
class Logits:
    """Output of a head.

    Attributes:
        query: ``(n_query, n_way)`` float64 logits of the cases, from the fit on the full support.
        distances: ``(n_query,)`` distance of each case to the support (NaN: the method has none).
        support_held_out: ``(n_support, n_way)`` each support scan's logits from the fit without
            it (see :mod:`medmeta.leave_one_out`), or None when not asked for or impossible (a
            condition with one scan).
        max_change: ``(n_query,)`` leave-one-out stability of each case (largest change of any
            probability at ``temperature``), or None.
        nearest: ``(n_query, k)`` the support scans nearest each case, by index into the
            support, nearest first: Euclidean distance between the embeddings the head compares
            (after the run's normalisation, if any); None for a learner that does not adapt on
            embeddings. ``nearest_distances`` ``(n_query, k)`` those distances.
        occlusion: each case's logits with each window hidden
            (:class:`~medmeta.pipeline.saliency.OcclusionScores`, for its saliency map), or
            None when not asked for.
    """

    query: np.ndarray
    distances: np.ndarray
    support_held_out: np.ndarray | None = None
    max_change: np.ndarray | None = None
    nearest: np.ndarray | None = None
    nearest_distances: np.ndarray | None = None
    occlusion: OcclusionScores | None = None


#: How many support scans :attr:`Logits.nearest` names per case.
NEAREST_SUPPORT = 3


class LearnerHead:
    """Adapts a :class:`~medmeta.methods.MetaLearner` to a task's support and scores its cases.

    Contract of a head: ``head(task, held_out=..., stability=..., temperature=...) -> Logits``,
    in evaluation mode, never changing the learner's weights. ``batch_size`` cases are scored at
    a time (None: all at once). The learner must already be on ``device``; tensors are moved
    there here (device handling stays at this edge, not in the methods).
    """

    def __init__(self, learner, device: torch.device | str = "cpu", batch_size: int | None = 64):
        self.learner = learner
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(
        self, task: Task, held_out: bool = False, stability: bool = False, temperature: float = 1.0, nearest: bool = False,
        saliency: bool = False,
    ) -> Logits:
        """``held_out``: also the support's leave-one-out logits; ``stability``: also each
        case's leave-one-out stability. Both need two support scans per condition and are
        left None otherwise. ``nearest``: also each case's nearest support scans (for a learner
        that adapts on embeddings). ``saliency``: also each case's logits with each occlusion
        window hidden, through the learner fitted on the full support.

        A learner that adapts on embeddings (:mod:`medmeta.embedded`) sees each scan through the
        backbone once: the fit, the cases' logits and the leave-one-out refits share the
        embeddings (before, the refits embedded the cases a second time)."""
        image_learner = self.learner
        learner, support, query = self.learner, task.support_images.to(self.device), task.query_images
        labels = task.support_labels.to(self.device)
        size = self.batch_size or max(1, len(query))
        if adapts_on_embeddings(learner):
            learner = OnEmbeddings(learner)
            support = learner.embed_all(support, self.device, max(1, len(support)))  # one pass, as fit_support's
            query = learner.embed_all(query, self.device, size)
        learner.fit_support(support, labels)
        logits, distances = [], []
        for start in range(0, len(query), size):
            batch_logits, batch_distances = learner.predict_with_distance(query[start : start + size].to(self.device))
            logits.append(batch_logits.double().cpu())
            distances.append(batch_distances.double().cpu())
        out = Logits(torch.cat(logits).numpy(), torch.cat(distances).numpy())
        if nearest and isinstance(learner, OnEmbeddings):
            out.nearest, out.nearest_distances = nearest_support(query, support, self.device, size)
        if saliency:  # before the leave-one-out refits, which leave the learner fitted to a part of the support
            out.occlusion = occlusion_logits(image_learner, task.query_images, self.device)
        if (held_out or stability) and task.has_two_per_condition():
            loo = leave_one_out(learner, support, labels, query if stability else None, temperature, self.device, size)
            out.support_held_out = loo.support_logits if held_out else None
            out.max_change = loo.max_change
        return out


def nearest_support(query: torch.Tensor, support: torch.Tensor, device, batch_size: int, k: int = NEAREST_SUPPORT):
    """``(n_query, d)`` and ``(n_support, d)`` embeddings -> the indices ``(n_query, k)`` of each
    case's ``k`` nearest support embeddings (Euclidean, nearest first; fewer when the support is
    smaller) and their distances ``(n_query, k)``."""
    k = min(k, len(support))
    support = support.to(device).double()
    indices, distances = [], []
    for start in range(0, len(query), batch_size):
        d = torch.cdist(query[start : start + batch_size].to(device).double(), support)
        found = d.topk(k, dim=1, largest=False)
        indices.append(found.indices.cpu())
        distances.append(found.values.cpu())
    return torch.cat(indices).numpy(), torch.cat(distances).numpy()
