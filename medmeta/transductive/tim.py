"""Transductive Information Maximization, gradient-descent version (TIM-GD)."""

from __future__ import annotations

import torch
from torch import Tensor

from medmeta.transductive.base import TransductiveRefiner, class_means, one_hot, shots, squared_distances

_TINY = 1e-12  # floor of probabilities inside logarithms and powers


def shannon_entropy(p: Tensor) -> Tensor:
    """``(..., n_way)`` probabilities -> ``(...)`` Shannon entropies (nats)."""
    return -(p * torch.log(p.clamp_min(_TINY))).sum(-1)


def tsallis_entropy(p: Tensor, alpha: float) -> Tensor:
    """``(..., n_way)`` probabilities -> ``(...)`` Tsallis alpha-entropies ``(1 - sum_c p_c^alpha) / (alpha - 1)``.

    ``alpha == 1`` gives the Shannon entropy (its limit).
    """
    if alpha == 1:
        return shannon_entropy(p)
    return (1.0 - p.clamp_min(_TINY).pow(alpha).sum(-1)) / (alpha - 1.0)


def entropy_gradient(p: Tensor, alpha: float) -> Tensor:
    """``(..., n_way)`` probabilities -> ``(..., n_way)`` partial derivatives of the (Tsallis
    ``alpha``, Shannon for ``alpha == 1``) entropy with respect to each ``p_c``."""
    p = p.clamp_min(_TINY)
    if alpha == 1:
        return -(torch.log(p) + 1.0)
    return -alpha / (alpha - 1.0) * p.pow(alpha - 1.0)


class TIMGD(TransductiveRefiner):
    """Boudiaf, Masud, Rony, Dolz, Piantanida & Ben Ayed, "Information Maximization for Few-Shot
    Learning", NeurIPS 2020 (TIM-GD).

    A classifier with weights ``W (n_way, d)``, initialised at the support class means, gives the
    logits ``-temperature / 2 * ||x - w_c||^2``. ``W`` is fitted with ``n_iter`` Adam steps on::

        ce_weight * CE(support) - marginal_weight * H(mean_j p_j) + conditional_weight * mean_j H(p_j)

    where ``p_j (n_way,)`` is the predicted distribution of query case ``j``: the support must be
    classified right, each query case confidently, and the batch's predicted class proportions
    ``mean_j p_j`` must have a *high* entropy.

    Batch assumption: **balanced**. The marginal-entropy term is largest when the batch holds every
    class equally often, so it pushes the predictions towards equal class counts; on an imbalanced
    batch (e.g. 80/10/10) it relabels majority cases as minority classes (Veilleux et al. 2021;
    ``docs/transductive.md`` measures it). Prefer :class:`~medmeta.transductive.alpha_tim.AlphaTIM`
    unless the batch is known to be balanced.

    The paper runs 1000 Adam steps at learning rate 1e-4 with loss weights (0.1, 1, 0.1) and
    temperature 15; the defaults here take 50 steps at 2e-3 (Adam moves each weight by about the
    learning rate per step, so about the same distance, twenty times cheaper; on the synthetic
    benchmark the two budgets give the same accuracy within 1 point, ``docs/transductive.md``).
    The gradient of the loss is computed in closed form (no autograd: nothing is recorded, whatever
    the caller's grad mode), and Adam is applied by hand, deterministically.

    Args:
        n_iter: Adam steps.
        lr: Adam learning rate.
        temperature: scale of the logits (15 in the paper, for L2-normalised features).
        ce_weight, marginal_weight, conditional_weight: weights of the three terms.
    """

    name = "tim_gd"
    _betas = (0.9, 0.999)  # Adam's defaults
    _adam_eps = 1e-8

    def __init__(
        self,
        n_iter: int = 50,
        lr: float = 2e-3,
        temperature: float = 15.0,
        ce_weight: float = 0.1,
        marginal_weight: float = 1.0,
        conditional_weight: float = 0.1,
    ):
        self.n_iter = n_iter
        self.lr = lr
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.marginal_weight = marginal_weight
        self.conditional_weight = conditional_weight

    def entropy_order(self, shot: int) -> float:
        """Order of the query entropies (1: Shannon); :class:`AlphaTIM` overrides it."""
        return 1.0

    def logits(self, x: Tensor, weights: Tensor) -> Tensor:
        """``(n, d)`` embeddings, ``(n_way, d)`` weights -> ``(n, n_way)`` logits."""
        return -0.5 * self.temperature * squared_distances(x, weights)

    def loss(self, support: Tensor, support_labels: Tensor, query: Tensor, weights: Tensor) -> Tensor:
        """The objective (a 0-d tensor) for ``(n_support, d)``, ``(n_support,)``, ``(n_query, d)``
        and ``(n_way, d)`` weights; differentiable with autograd (used to check :meth:`gradient`)."""
        alpha = self.entropy_order(shots(support_labels, weights.shape[0]))
        log_ps = torch.log_softmax(self.logits(support, weights), dim=1)
        ce = -log_ps.gather(1, support_labels.unsqueeze(1)).mean()
        p = torch.softmax(self.logits(query, weights), dim=1)
        return (
            self.ce_weight * ce
            - self.marginal_weight * tsallis_entropy(p.mean(0), alpha)
            + self.conditional_weight * tsallis_entropy(p, alpha).mean()
        )

    def gradient(self, support: Tensor, support_onehot: Tensor, query: Tensor, weights: Tensor, alpha: float) -> Tensor:
        """Closed-form ``(n_way, d)`` gradient of :meth:`loss` with respect to ``weights``.

        ``support_onehot (n_support, n_way)``; ``alpha`` is the entropies' order (1: Shannon).
        """
        cases = torch.cat([support, query])  # (n_cases, d)
        return self._gradient(cases, (cases * cases).sum(1, keepdim=True), support_onehot, weights, alpha)

    def _gradient(self, cases: Tensor, cases_sq: Tensor, support_onehot: Tensor, weights: Tensor, alpha: float) -> Tensor:
        """:meth:`gradient` on the stacked ``(n_support + n_query, d)`` cases and their ``(n_cases, 1)``
        squared norms (computed once per episode).

        With logits ``l_ic = -t/2 ||x_i - w_c||^2`` and ``G = dL/dl (n_cases, n_way)``,
        ``dL/dw_c = t * sum_i G_ic (x_i - w_c)``.
        """
        n_s = support_onehot.shape[0]
        n_q = cases.shape[0] - n_s
        d2 = (cases_sq - 2.0 * (cases @ weights.T) + (weights * weights).sum(1)).clamp_min_(0.0)
        prob = torch.softmax(d2.mul_(-0.5 * self.temperature), dim=1)  # (n_cases, n_way)
        g = torch.empty_like(prob)
        # support cross-entropy: dL/dl = (softmax - onehot) * ce_weight / n_s
        torch.sub(prob[:n_s], support_onehot, out=g[:n_s]).mul_(self.ce_weight / n_s)
        # query terms: dL/dp_j = (-marginal * H'(mean p) + conditional * H'(p_j)) / n_q, then the softmax
        p = prob[n_s:]  # (n_query, n_way)
        g_p = (
            entropy_gradient(p, alpha).mul_(self.conditional_weight / n_q)
            - entropy_gradient(p.mean(0, keepdim=True), alpha) * (self.marginal_weight / n_q)
        )
        torch.mul(p, g_p - (p * g_p).sum(1, keepdim=True), out=g[n_s:])
        return self.temperature * (g.T @ cases - g.sum(0).unsqueeze(1) * weights)

    def _refine(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        if self.n_iter < 0 or self.lr <= 0 or self.temperature <= 0:
            raise ValueError(
                f"need n_iter >= 0, lr > 0 and temperature > 0, got {self.n_iter}, {self.lr}, {self.temperature}"
            )
        alpha = self.entropy_order(shots(support_labels, n_way))
        s_onehot = one_hot(support_labels, n_way, support)  # (n_support, n_way)
        cases = torch.cat([support, query])  # (n_cases, d)
        cases_sq = (cases * cases).sum(1, keepdim=True)  # (n_cases, 1)
        weights = class_means(support, support_labels, n_way)  # (n_way, d), a new tensor
        m = torch.zeros_like(weights)  # Adam's first and second moments
        v = torch.zeros_like(weights)
        b1, b2 = self._betas
        for step in range(1, self.n_iter + 1):
            g = self._gradient(cases, cases_sq, s_onehot, weights, alpha)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v.div(1 - b2**step).sqrt_().add_(self._adam_eps)
            weights.addcdiv_(m, denom, value=-self.lr / (1 - b1**step))
        return self.logits(query, weights)
