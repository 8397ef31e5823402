"""The self-supervised auxiliary loss of pre-training: two augmented views of each image are
pulled together and pushed away from the other images of the batch (SimCLR's NT-Xent; Chen et
al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"), on top of
the classification loss, as in the few-shot work that adds self-supervision to pre-training
(Gidaris et al. 2019; Su et al. 2020, "When does self-supervision improve few-shot learning?").

It asks the backbone to tell images apart by what survives augmentation (shape, texture),
not only by what separates the meta-train classes, which is what a condition in a modality
never seen in meta-training needs."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: Temperature of the similarity logits.
CONTRASTIVE_TEMPERATURE = 0.2
#: Width of the projection's output.
PROJECTION_FEATURES = 128


class ProjectionHead(nn.Module):
    """The small MLP the contrastive loss sees (discarded after pre-training, like the
    classifier): ``(n, in_features)`` -> ``(n, out_features)``."""

    def __init__(self, in_features: int, out_features: int = PROJECTION_FEATURES):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(inplace=True), nn.Linear(in_features, out_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = CONTRASTIVE_TEMPERATURE) -> torch.Tensor:
    """The normalised-temperature cross-entropy of two views ``z1``, ``z2`` ``(n, d)`` of the
    same ``n`` images: each of the ``2n`` embeddings must pick its other view among the other
    ``2n - 1`` by cosine similarity / ``temperature``. A scalar; ``log(2n - 1)`` when all
    embeddings are equal."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"two views of shape (n, d) expected, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)
