"""Refitting a learner without one support scan at a time.

One loop of refits gives two things:

- **stability**: how much each case's probabilities move when one support scan is left out
  (the largest change of any class probability over all refits);
- **out-of-sample support predictions**: each support scan's logits from the fit without it. The
  support scans of an episode are drawn from the same conditions as its cases, so these are the
  only labelled predictions at adaptation time that are exchangeable (up to having one scan
  fewer) with the cases themselves; :func:`medmeta.calibration.episode_conformal` builds
  prediction sets from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medmeta.calibration import softmax
from medmeta.embedded import OnEmbeddings, adapts_on_embeddings


@dataclass
class LeaveOneOut:
    """Results of :func:`leave_one_out`.

    Attributes:
        support_logits: ``(n_support, n_way)`` logits of each support scan from the fit on the
            other scans, corrected by the method for the scan its own class lost
            (:meth:`~medmeta.methods.base.MetaLearner.correct_held_out_logits`).
        max_change: ``(n_query,)`` largest absolute change of any temperature-scaled class
            probability of each query over the refits, against the fit on the full support
            (None when no queries were given).
    """

    support_logits: np.ndarray
    max_change: np.ndarray | None


def has_two_per_class(support_labels: torch.Tensor) -> bool:
    """Whether every class keeps a support scan when any one scan is left out."""
    counts = torch.bincount(support_labels)
    return len(counts) > 0 and int(counts.min()) >= 2


@torch.no_grad()
def _fit_predict(learner, support_images, support_labels, images, device, batch_size) -> np.ndarray:
    """Fit to the support and return the logits ``(n, n_way)`` of ``images``, float64 on the CPU."""
    learner.fit_support(support_images.to(device), support_labels.to(device))
    parts = [
        learner.predict_query(images[start : start + batch_size].to(device)).double().cpu()
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(parts).numpy() if parts else np.zeros((0, int(support_labels.max()) + 1))


def leave_one_out(
    learner,
    support_images: torch.Tensor,
    support_labels: torch.Tensor,
    query_images: torch.Tensor | None = None,
    temperature: float = 1.0,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> LeaveOneOut:
    """Refit ``learner`` once per support scan, without it.

    Args:
        support_images: ``(n_support, C, H, W)``.
        support_labels: ``(n_support,)`` in ``[0, n_way)``, at least two scans per class (so
            every class keeps a scan in every refit).
        query_images: ``(n_query, C, H, W)`` cases whose stability is wanted, or None.
        temperature: divides the logits before the softmax of the stability measure.

    A learner that refits on embeddings (an embedding head's, with ``embed``, ``fit_embedded``
    and ``predict_embedded``) embeds every scan once and refits its head only; the others are
    refitted on the images.

    The learner is left fitted to the last refit; fit it again before using it.
    """
    device = torch.device(device)
    if not has_two_per_class(support_labels):
        raise ValueError("leave-one-out refits need at least two support scans per class")
    if adapts_on_embeddings(learner):
        learner = OnEmbeddings(learner)
        support_images = learner.embed_all(support_images, device, batch_size)
        query_images = None if query_images is None else learner.embed_all(query_images, device, batch_size)
    n = len(support_labels)
    base = None
    if query_images is not None:
        base = softmax(_fit_predict(learner, support_images, support_labels, query_images, device, batch_size) / temperature)
        worst = np.zeros(len(query_images))
    support_logits = []
    for left_out in range(n):
        keep = torch.arange(n) != left_out
        images = support_images[left_out : left_out + 1]
        if query_images is not None:
            images = torch.cat([images, query_images])
        logits = _fit_predict(learner, support_images[keep], support_labels[keep], images, device, batch_size)
        support_logits.append(logits[0])
        if base is not None:
            worst = np.maximum(worst, np.abs(softmax(logits[1:] / temperature) - base).max(axis=1))
    held_out = learner.correct_held_out_logits(np.stack(support_logits), support_labels.cpu().numpy())
    return LeaveOneOut(held_out, worst if base is not None else None)

