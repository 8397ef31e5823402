"""A learner whose adaptation is an embedding head: backbone -> normaliser -> head."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medmeta.errors import MedmetaError
from medmeta.heads.base import BackboneHead, EmbeddingHead
from medmeta.heads.normalise import EmbeddingNormaliser


class HeadLearner(nn.Module):
    """Wraps a trained :class:`~medmeta.methods.MetaLearner` so that ``--head`` replaces its
    adaptation: its backbone embeds the scans, ``normaliser`` normalises the embeddings and
    ``head`` is fitted on the support's. It has the learner's adaptation interface
    (``fit_support``, ``predict_query``, ``predict_with_distance``, ``support_distance``,
    ``correct_held_out_logits``), so episodes, leave-one-out refits and the adaptation pipeline
    use it unchanged. The learner's weights are never changed.

    With a ``refiner`` (``--transductive``) the logits of the cases scored together come from
    transductive refinement over that whole batch (:mod:`medmeta.transductive`); callers then
    score all cases of a task at once.
    """

    def __init__(self, learner: nn.Module, head: EmbeddingHead, normaliser: EmbeddingNormaliser | None = None, refiner=None):
        super().__init__()
        self.learner = learner
        self.head = head
        self.normaliser = normaliser or EmbeddingNormaliser("none")
        #: a :class:`~medmeta.transductive.TransductiveRefiner`: when set, the logits of a batch of
        #: cases come from it (it sees the whole batch); distances stay the head's
        self.refiner = refiner

    @property
    def backbone(self) -> nn.Module:
        return self.learner.backbone

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, C, H, W)`` -> normalised ``(n, d)`` embeddings."""
        return self.normaliser(self.learner.backbone(images))

    def fit_support(self, support_images: torch.Tensor, support_labels: torch.Tensor) -> "HeadLearner":
        """Fit the head to ``support_images`` ``(n_support, C, H, W)`` with ``support_labels``
        ``(n_support,)``."""
        return self.fit_embedded(self.embed(support_images), support_labels)

    def fit_embedded(self, support: torch.Tensor, support_labels: torch.Tensor) -> "HeadLearner":
        """Fit the head to embeddings ``support`` ``(n_support, d)`` from :meth:`embed` (how
        leave-one-out refits run without the backbone)."""
        self.support_, self.support_labels_ = support, support_labels
        self.head.fit(support, support_labels)
        return self

    def predict_with_distance(self, query_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(n_query, n_way)`` and distances to the support ``(n_query,)``, one backbone pass."""
        return self.predict_embedded(self.embed(query_images))

    def predict_embedded(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and distances of embeddings ``query`` ``(n_query, d)`` from :meth:`embed`."""
        if self.refiner is not None:
            n_way = int(self.support_labels_.max().item()) + 1
            logits = self.refiner.refine(self.support_, self.support_labels_, query, n_way)
        else:
            logits = self.head.logits(query)
        return logits, self.head.distance(query)

    def predict_query(self, query_images: torch.Tensor) -> torch.Tensor:
        return self.predict_with_distance(query_images)[0]

    def support_distance(self, query_images: torch.Tensor) -> torch.Tensor:
        return self.head.distance(self.embed(query_images))

    def correct_held_out_logits(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.head.correct_held_out_logits(logits, labels)


def adapting_learner(learner: nn.Module, head, normaliser: EmbeddingNormaliser | None = None, refiner=None) -> nn.Module:
    """``learner`` with ``head`` as its adaptation: a :class:`HeadLearner` for an
    :class:`~medmeta.heads.base.EmbeddingHead`, the head's own learner for a
    :class:`~medmeta.heads.base.BackboneHead` (which takes no transductive ``refiner``)."""
    if isinstance(head, BackboneHead):
        if refiner is not None:
            raise MedmetaError(f"--transductive refines embedding heads; the {head.name} head adapts the backbone: "
                               "choose --head prototype or logistic")
        return head.learner(learner, normaliser)
    return HeadLearner(learner, head, normaliser, refiner)
