"""Prototype refinement by soft k-means over the query batch."""

from __future__ import annotations

import torch
from torch import Tensor

from medmeta.transductive.base import TransductiveRefiner, check_episode, one_hot, squared_distances


class SoftKMeans(TransductiveRefiner):
    """Ren, Triantafillou, Ravi, Snell, Swersky, Tenenbaum, Larochelle & Zemel, "Meta-Learning for
    Semi-Supervised Few-Shot Classification", ICLR 2018 (the "soft k-means" refinement).

    Starts from the class means of the support, then repeats ``n_iter`` times: every query case is
    softly assigned to the classes, ``z (n_query, n_way) = softmax(-||q - p_c||^2 / temperature)``,
    and each prototype becomes the weighted mean of its support cases (weight 1 each) and of all
    query cases (weight ``z[:, c]``)::

        p_c = (sum_{i in S_c} s_i + sum_j z_jc q_j) / (|S_c| + sum_j z_jc)

    Ren et al. run one refinement step on meta-trained embeddings with temperature 1. On L2-normalised
    embeddings squared distances lie in [0, 4], so a temperature well below 1 is needed for the
    assignments to be more than uniform. The defaults (5 iterations, temperature 0.05) were picked
    on the synthetic benchmark (``docs/transductive.md``, a seed not used for the reported table):
    a higher temperature gains more on balanced batches and loses more on imbalanced ones. The best
    value depends on how spread the embeddings are; re-check it on validation-class episodes.

    Batch assumption: none about the class proportions (an absent or rare class only receives
    little query weight), but every query case is assumed to belong to one of the ``n_way`` classes:
    an out-of-distribution case still pulls the prototypes towards itself. With 1 shot the query
    cases outweigh the support, so a batch dominated by one class can drag a neighbouring prototype.

    Args:
        n_iter: refinement iterations (0 gives the inductive prototypes).
        temperature: softmax temperature of the soft assignments, on squared distances.

    The returned logits are ``-||q - p_c||^2 / temperature`` with the refined prototypes.
    """

    name = "soft_kmeans"

    def __init__(self, n_iter: int = 5, temperature: float = 0.05):
        self.n_iter = n_iter
        self.temperature = temperature

    def prototypes(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        """The refined ``(n_way, d)`` prototypes, for ``(n_support, d)`` support embeddings,
        ``(n_support,)`` labels and ``(n_query, d)`` query embeddings (checked as in :meth:`refine`)."""
        support, support_labels, query, n_way = check_episode(support, support_labels, query, n_way)
        with torch.no_grad():
            return self._prototypes(support.detach(), support_labels, query.detach(), n_way)

    def _prototypes(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        if self.n_iter < 0 or self.temperature <= 0:
            raise ValueError(f"need n_iter >= 0 and temperature > 0, got {self.n_iter}, {self.temperature}")
        s_onehot = one_hot(support_labels, n_way, support)  # (n_support, n_way)
        s_sum = s_onehot.T @ support  # (n_way, d)
        s_count = s_onehot.sum(0)  # (n_way,)
        prototypes = s_sum / s_count.unsqueeze(1)  # (n_way, d), the support means
        for _ in range(self.n_iter):
            z = torch.softmax(-squared_distances(query, prototypes) / self.temperature, dim=1)  # (n_query, n_way)
            prototypes = (s_sum + z.T @ query) / (s_count + z.sum(0)).unsqueeze(1)
        return prototypes

    def _refine(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        prototypes = self._prototypes(support, support_labels, query, n_way)
        return -squared_distances(query, prototypes) / self.temperature
