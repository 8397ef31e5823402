"""Multinomial logistic regression on the support embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medmeta.heads.base import EmbeddingHead
from medmeta.heads.registry import register_head


@register_head("logistic")
class LogisticHead(EmbeddingHead):
    """Tian, Wang, Krishnan, Tenenbaum & Isola, "Rethinking Few-Shot Image Classification: a Good
    Embedding Is All You Need?", ECCV 2020.

    A multinomial logistic regression (scikit-learn, L-BFGS, L2 penalty of inverse strength
    ``C``) fitted on the support embeddings; the logits are its decision function. The fit is
    deterministic.

    Args:
        C: inverse regularisation strength.
        max_iter: L-BFGS iterations.
    """

    name = "logistic"

    def __init__(self, C: float = 1.0, max_iter: int = 1000):
        if not C > 0:
            raise ValueError(f"C must be > 0, got {C!r}")
        self.C = float(C)
        self.max_iter = int(max_iter)

    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> "LogisticHead":
        from sklearn.linear_model import LogisticRegression

        self._fit_class_means(support, labels)
        self.n_way_ = int(labels.max().item()) + 1
        self.model_ = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(
            support.detach().double().cpu().numpy(), labels.detach().cpu().numpy()
        )
        return self

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        if getattr(self, "model_", None) is None:
            raise RuntimeError("call fit before logits")
        scores = np.asarray(self.model_.decision_function(query.detach().double().cpu().numpy()), dtype=np.float64)
        if scores.ndim == 1:  # two classes: one score s for class 1 -> logits (0, s), the same softmax
            scores = np.stack([np.zeros_like(scores), scores], axis=1)
        return torch.as_tensor(scores, device=query.device)

    def hparams(self) -> dict[str, Any]:
        return {"C": self.C, "max_iter": self.max_iter}
