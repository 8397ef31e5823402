"""Prototype rectification (BD-CSPN): intra-class bias and cross-class shift reduction."""

from __future__ import annotations

import torch
from torch import Tensor

from medmeta.transductive.base import TransductiveRefiner, check_episode, class_means, cosine_similarity, one_hot


class BDCSPN(TransductiveRefiner):
    """Liu, Song & Qin, "Prototype Rectification for Few-Shot Learning", ECCV 2020 (BD-CSPN).

    Two steps, both label-free on the query batch:

    1. *Cross-class shift* (``shift=True``): every query embedding is moved by
       ``xi (d,) = mean(support) - mean(query)``, so that the batch's mean meets the support's.
    2. *Intra-class bias*: the query cases are pseudo-labelled with the class of the most
       cosine-similar support mean ``P_c``; each class's rectified prototype is the weighted mean of
       its support cases and of the queries pseudo-labelled with it, with weights
       ``softmax_i(epsilon * cos(x_i, P_c))`` taken over those cases only.

    The logits are ``epsilon * cos(q, P'_c)`` with the shifted queries and rectified prototypes.
    The paper adds only the top-Z most confident pseudo-labelled queries; this implementation adds
    all of them (the similarity weights already discount the unsure ones).

    Batch assumption: the shift assumes that the query batch's mean is where the support's mean is,
    i.e. that the batch holds the classes in the same proportions as the support (balanced, with
    equal shots). In an imbalanced batch the mean leans towards the majority class and the shift
    moves every query away from it; ``shift=False`` keeps only the rectification, which assumes
    nothing about the proportions. Conversely, when the whole batch is shifted (another scanner,
    another site) the shift is what corrects it.

    Args:
        epsilon: inverse temperature of the cosine weights and scale of the logits (10 in the paper).
        shift: apply the cross-class shift.
    """

    name = "bd_cspn"

    def __init__(self, epsilon: float = 10.0, shift: bool = True):
        self.epsilon = epsilon
        self.shift = shift

    def prototypes(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> tuple[Tensor, Tensor]:
        """``(rectified prototypes (n_way, d), shifted query (n_query, d))`` for ``(n_support, d)``
        support embeddings, ``(n_support,)`` labels and ``(n_query, d)`` query embeddings (checked as
        in :meth:`refine`; the query is returned unshifted when ``shift=False``)."""
        support, support_labels, query, n_way = check_episode(support, support_labels, query, n_way)
        with torch.no_grad():
            return self._prototypes(support.detach(), support_labels, query.detach(), n_way)

    def _prototypes(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> tuple[Tensor, Tensor]:
        if self.shift:
            query = query + (support.mean(0) - query.mean(0))  # (n_query, d), a new tensor
        prototypes = class_means(support, support_labels, n_way)  # (n_way, d)
        cases = torch.cat([support, query])  # (n_support + n_query, d)
        cos = cosine_similarity(cases, prototypes)  # (n_cases, n_way)
        pseudo = cos[support.shape[0]:].argmax(1)  # (n_query,)
        labels = torch.cat([support_labels, pseudo])  # (n_cases,)
        member = one_hot(labels, n_way, support).bool()  # (n_cases, n_way)
        scores = (self.epsilon * cos).masked_fill(~member, float("-inf"))
        weights = torch.softmax(scores, dim=0)  # (n_cases, n_way), each column sums to 1 over its members
        return weights.T @ cases, query

    def _refine(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        rectified, query = self._prototypes(support, support_labels, query, n_way)
        return self.epsilon * cosine_similarity(query, rectified)
