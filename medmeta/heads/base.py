"""The contract of an adaptation head: fitted on support embeddings, scoring case embeddings."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from medmeta.methods.protonet import compute_prototypes, squared_distances


class EmbeddingHead(ABC):
    """A classifier fitted at adaptation time on the support's embeddings.

    A head sees only embeddings (already normalised by the run's
    :class:`~medmeta.heads.normalise.EmbeddingNormaliser`), never images or the backbone, so
    refitting it (leave-one-out, stability) costs no backbone pass. ``__init__`` stores
    hyperparameters only; :meth:`fit` returns the head; fitted state ends in ``_``.
    """

    #: name in :data:`medmeta.heads.HEADS` and in checkpoints
    name: str = "base"

    @abstractmethod
    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> "EmbeddingHead":
        """Fit to ``support`` ``(n_support, d)`` with ``labels`` ``(n_support,)`` int64 in
        ``[0, n_way)``, every class present."""

    @abstractmethod
    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """``(n_query, n_way)`` logits of ``query`` ``(n_query, d)``."""

    def distance(self, query: torch.Tensor) -> torch.Tensor:
        """``(n_query,)`` Euclidean distance of each case to the nearest class mean of the
        support (what referral thresholds): the same for every head on the same embeddings."""
        if self.class_means_ is None:
            raise RuntimeError("call fit before distance")
        return squared_distances(query, self.class_means_).min(dim=1).values.clamp_min(0).sqrt()

    def correct_held_out_logits(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Leave-one-out support logits made comparable to a case's (see
        :meth:`medmeta.methods.MetaLearner.correct_held_out_logits`); default unchanged."""
        return np.asarray(logits, dtype=np.float64)

    def hparams(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable), as stored with a calibration record."""
        return {}

    class_means_: torch.Tensor | None = None

    def _fit_class_means(self, support: torch.Tensor, labels: torch.Tensor) -> None:
        self.class_means_ = compute_prototypes(support, labels)


class BackboneHead(ABC):
    """A head that adapts the backbone too (e.g. fine-tuning its last block on the support), so
    it cannot work on fixed embeddings: :meth:`learner` wraps a trained learner into one with
    the adaptation interface of :class:`~medmeta.heads.HeadLearner`. ``__init__`` stores
    hyperparameters only."""

    name: str = "base"

    @abstractmethod
    def learner(self, learner, normaliser=None):
        """The adapting learner on ``learner``'s backbone, with the run's embedding ``normaliser``."""

    def hparams(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable), as stored in the checkpoint."""
        return {}
