"""Nearest class mean on normalised embeddings (SimpleShot)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medmeta.heads.base import EmbeddingHead
from medmeta.heads.registry import register_head
from medmeta.methods.protonet import DISTANCES, held_out_correction, squared_distances


@register_head("prototype")
class PrototypeHead(EmbeddingHead):
    """Wang, Chao, Weinberger & van der Maaten, "SimpleShot: Revisiting Nearest-Neighbor
    Classification for Few-Shot Learning", arXiv:1911.04623, 2019.

    Each condition is the mean of its support embeddings; a case's logit for a condition is
    minus its (squared, or plain) Euclidean distance to that mean, divided by ``scale``. On
    centred, L2-normalised embeddings (the run's normaliser) this is SimpleShot's CL2N
    nearest-centroid rule; on raw embeddings it is ProtoNet's rule (Snell et al. 2017).

    Args:
        distance: ``"euclidean"`` (default: probabilities a temperature calibrates well) or
            ``"squared"`` (ProtoNet's).
        scale: divisor of the distances.
    """

    name = "prototype"

    def __init__(self, distance: str = "euclidean", scale: float = 1.0):
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        self.distance_kind = distance
        self.scale = float(scale)

    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> "PrototypeHead":
        self._fit_class_means(support, labels)
        return self

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        if self.class_means_ is None:
            raise RuntimeError("call fit before logits")
        squared = squared_distances(query, self.class_means_)
        if self.distance_kind == "euclidean":
            return -squared.clamp_min(1e-12).sqrt() / self.scale
        return -squared / self.scale

    def correct_held_out_logits(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return held_out_correction(logits, labels, self.distance_kind)

    def hparams(self) -> dict[str, Any]:
        return {"distance": self.distance_kind, "scale": self.scale}
