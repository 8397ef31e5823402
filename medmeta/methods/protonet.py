"""Prototypical Networks."""

from __future__ import annotations

import torch
from torch import nn

from medmeta.methods.base import MetaLearner
from medmeta.methods.registry import register_method


@register_method("protonet")
class ProtoNet(MetaLearner):
    """Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017.

    Each class is represented by the mean embedding (prototype) of its support images; a query's
    logit for a class is its negative squared Euclidean distance to that prototype, divided by
    ``scale`` (1 in the paper; a fixed larger value keeps softmax well-conditioned for
    high-dimensional pre-trained features).

    Args:
        backbone: module mapping ``(n, C, H, W)`` to ``(n, d)`` embeddings.
        scale: divisor of the squared distances.
    """

    def __init__(self, backbone: nn.Module, scale: float = 1.0):
        super().__init__(backbone)
        self.scale = float(scale)
        self.prototypes_: torch.Tensor | None = None

    def fit_support(self, support_images: torch.Tensor, support_labels: torch.Tensor) -> "ProtoNet":
        embeddings = self.backbone(support_images)  # (n_support, d)
        self.prototypes_ = compute_prototypes(embeddings, support_labels)  # (n_way, d)
        return self

    def predict_query(self, query_images: torch.Tensor) -> torch.Tensor:
        if self.prototypes_ is None:
            raise RuntimeError("call fit_support before predict_query")
        return -squared_distances(self.backbone(query_images), self.prototypes_) / self.scale

    def support_distance(self, query_images: torch.Tensor) -> torch.Tensor:
        if self.prototypes_ is None:
            raise RuntimeError("call fit_support before support_distance")
        return squared_distances(self.backbone(query_images), self.prototypes_).min(dim=1).values.sqrt()

    def hparams(self) -> dict:
        return {"scale": self.scale}


def compute_prototypes(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Class means: ``(n_support, d)`` and ``(n_support,)`` labels -> ``(n_way, d)``."""
    n_way = int(labels.max().item()) + 1
    one_hot = torch.nn.functional.one_hot(labels, n_way).to(embeddings.dtype)  # (n_support, n_way)
    return (one_hot.T @ embeddings) / one_hot.sum(dim=0, keepdim=True).T


def squared_distances(queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``(n_query, d)`` x ``(n_way, d)`` -> ``(n_query, n_way)`` squared Euclidean distances."""
    return (queries.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(dim=-1)
