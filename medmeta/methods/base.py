"""The interface every meta-learner shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class MetaLearner(nn.Module, ABC):
    """A few-shot classifier around a backbone.

    Life cycle of an episode (and of ``medmeta adapt``)::

        learner.fit_support(support_images, support_labels)   # returns learner
        logits = learner.predict_query(query_images)          # (n_query, n_way)

    Meta-training calls :meth:`episode_loss`. Methods hold no device logic: the caller moves
    the learner and the tensors. Hyperparameters are constructor arguments and are stored in
    checkpoints through :meth:`hparams`.

    Contract shared by every method:

    - any number of classes (``n_way``) at adaptation, whatever ``way`` it was trained with;
    - :meth:`fit_support` may be called under ``torch.no_grad()`` (evaluation, ``adapt``);
      methods that adapt by gradient steps enable autograd inside it themselves and never
      modify their own parameters (the checkpoint is unchanged by adaptation);
    - ``backbone_defaults`` are keyword arguments the training loop passes to the backbone
      unless the user overrides them (e.g. a normalisation without running statistics).
    """

    registry_name: str = "base"
    backbone_defaults: dict[str, Any] = {}

    @property
    def differentiates_backbone_twice(self) -> bool:
        """True when meta-training takes second derivatives through the backbone (second-order
        MAML), which ``torch.compile`` cannot (``--compile`` is refused then)."""
        return False

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    @abstractmethod
    def fit_support(self, support_images: torch.Tensor, support_labels: torch.Tensor) -> "MetaLearner":
        """Adapt to a labelled support set.

        Args:
            support_images: ``(n_support, C, H, W)``.
            support_labels: ``(n_support,)`` int64 in ``[0, n_way)``; every class present.
        """

    @abstractmethod
    def predict_query(self, query_images: torch.Tensor) -> torch.Tensor:
        """Logits ``(n_query, n_way)`` for ``query_images`` ``(n_query, C, H, W)``."""

    def support_distance(self, query_images: torch.Tensor) -> torch.Tensor:
        """``(n_query,)`` distance of each query to the adapted support (for out-of-distribution
        flags); methods without a natural distance return NaN."""
        return torch.full((query_images.shape[0],), float("nan"), device=query_images.device)

    def predict_with_distance(self, query_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict_query` and :meth:`support_distance` of ``query_images`` together:
        logits ``(n_query, n_way)`` and distances ``(n_query,)``. Methods whose two share the
        query embeddings override it to embed once (same numbers, half the backbone passes)."""
        return self.predict_query(query_images), self.support_distance(query_images)

    def episode_loss(
        self,
        support_images: torch.Tensor,
        support_labels: torch.Tensor,
        query_images: torch.Tensor,
        query_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta-training loss of one episode and the query logits ``(n_query, n_way)``."""
        logits = self.fit_support(support_images, support_labels).predict_query(query_images)
        return F.cross_entropy(logits, query_labels), logits

    def correct_held_out_logits(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Leave-one-out support logits ``(n_support, n_way)`` (each scan predicted from the fit
        without it; ``labels`` ``(n_support,)``) made comparable to a case's logits, which come
        from the fit on the full support. A scan predicted without itself sees one scan fewer of
        its own class, which makes these logits pessimistic; methods that know by how much
        correct it (see :class:`~medmeta.methods.protonet.ProtoNet`). Default: unchanged."""
        return np.asarray(logits, dtype=np.float64)

    def hparams(self) -> dict[str, Any]:
        """Constructor arguments other than the backbone (JSON-serialisable)."""
        return {}
