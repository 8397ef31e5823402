"""A few-shot task: the labelled support scans and the cases to diagnose, as tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Task:
    """What every step after reading works on.

    Attributes:
        support_images: ``(n_support, C, H, W)`` preprocessed scans (or their ``(n_support, d)``
            embeddings, for a learner seen through :class:`~medmeta.embedded.OnEmbeddings`).
        support_labels: ``(n_support,)`` int64 in ``[0, n_way)``; every condition present.
        query_images: ``(n_query, C, H, W)`` the cases to diagnose.
        conditions: the ``n_way`` condition names; label ``i`` is ``conditions[i]``.
        query_labels: ``(n_query,)`` true labels when known (episodes), else None.
    """

    support_images: torch.Tensor
    support_labels: torch.Tensor
    query_images: torch.Tensor
    conditions: list[str]
    query_labels: torch.Tensor | None = None

    @property
    def n_way(self) -> int:
        return len(self.conditions)

    def support_counts(self) -> list[int]:
        """Support scans per condition, in ``conditions`` order."""
        return torch.bincount(self.support_labels, minlength=self.n_way).tolist()

    def has_two_per_condition(self) -> bool:
        """Whether every condition keeps a support scan when any one scan is left out."""
        return min(self.support_counts()) >= 2
