"""Matching Networks."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from medmeta.methods.base import MetaLearner
from medmeta.methods.registry import register_method


@register_method("matching")
class MatchingNetworks(MetaLearner):
    """Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, "Matching Networks for One Shot
    Learning", NeurIPS 2016.

    A query is classified by attention over the labelled support set::

        a(q, x_i) = softmax_i(scale * cos(f(q), g(x_i)))
        p(y = c | q) = sum_{i : y_i = c} a(q, x_i)

    and its logit for class ``c`` is ``log p(y = c | q)`` (floored at the smallest positive float
    so that a class without attention mass stays finite). ``softmax(logits)`` is therefore the
    attention classifier's distribution, and ``cross_entropy(logits, y)`` its negative
    log-likelihood, the paper's training objective.

    Without full-context embeddings (``fce=False``) ``f = g =`` the backbone. With ``fce=True``
    (the paper's appendix):

    - ``g`` is a bidirectional LSTM over the sequence of support embeddings ``g'(x_i)``, with a
      residual connection: ``g(x_i) = h_fwd_i + h_bwd_i + g'(x_i)`` (hidden size
      ``num_features`` in each direction);
    - ``f`` is an attention LSTM that reads the support ``fce_steps`` times for each query:
      ``r = sum_i softmax_i(h . g(x_i)) g(x_i)``, ``h_hat, c = LSTM([f'(q), r], (h, c))``,
      ``h = h_hat + f'(q)``, starting from ``h = c = 0``; ``f(q)`` is the last ``h``. (The paper's
      LSTM with state ``[h, r]`` is the same function as an LSTM cell whose input is
      ``[f'(q), r]``, which is how it is implemented.)

    Queries never attend to one another, so predictions are per case (batching-independent).
    Without ``fce`` predictions are invariant to the order of the support set; with ``fce`` the
    support LSTM sees the support in the order given.

    Args:
        backbone: module mapping ``(n, C, H, W)`` to ``(n, d)`` embeddings; with ``fce`` it must
            expose ``num_features`` (``d``), which sizes both LSTMs.
        fce: use full-context embeddings.
        fce_steps: number of attention-LSTM read steps ``K`` for each query (``fce`` only).
        scale: multiplies the cosine similarities before the softmax. Cosines lie in
            ``[-1, 1]``; with ``scale=1`` the attention would be almost uniform over the support,
            so a fixed sharpness (10 by default) lets it concentrate on the nearest supports.
    """

    def __init__(self, backbone: nn.Module, fce: bool = False, fce_steps: int = 4, scale: float = 10.0):
        super().__init__(backbone)
        self.fce = bool(fce)
        self.fce_steps = int(fce_steps)
        self.scale = float(scale)
        if self.fce_steps < 1:
            raise ValueError(f"fce_steps must be at least 1, got {fce_steps}")
        if self.fce:
            d = getattr(backbone, "num_features", None)
            if not isinstance(d, int):
                raise ValueError("Matching Networks with fce=True need a backbone with an integer `num_features`")
            self.support_lstm = nn.LSTM(d, d, batch_first=True, bidirectional=True)
            self.query_lstm = nn.LSTMCell(2 * d, d)
        self.support_embeddings_: torch.Tensor | None = None
        self.support_one_hot_: torch.Tensor | None = None

    # ---- embeddings ------------------------------------------------------------------------
    def embed_support(self, support_images: torch.Tensor) -> torch.Tensor:
        """``g``: support images ``(n_support, C, H, W)`` -> embeddings ``(n_support, d)``."""
        embeddings = self.backbone(support_images)  # (n_support, d)
        if not self.fce:
            return embeddings
        out, _ = self.support_lstm(embeddings.unsqueeze(0))  # (1, n_support, 2d)
        forward, backward = out[0].chunk(2, dim=-1)
        return forward + backward + embeddings

    def embed_query(self, query_images: torch.Tensor, support_embeddings: torch.Tensor) -> torch.Tensor:
        """``f``: query images ``(n_query, C, H, W)`` and ``g(support)`` ``(n_support, d)`` ->
        query embeddings ``(n_query, d)``."""
        embeddings = self.backbone(query_images)  # (n_query, d)
        if not self.fce:
            return embeddings
        h = torch.zeros_like(embeddings)
        c = torch.zeros_like(embeddings)
        for _ in range(self.fce_steps):
            attention = torch.softmax(h @ support_embeddings.T, dim=1)  # (n_query, n_support)
            read = attention @ support_embeddings  # (n_query, d)
            h_hat, c = self.query_lstm(torch.cat([embeddings, read], dim=1), (h, c))
            h = h_hat + embeddings
        return h

    # ---- MetaLearner ---------------------------------------------------------------------------
    def fit_support(self, support_images: torch.Tensor, support_labels: torch.Tensor) -> "MatchingNetworks":
        n_way = int(support_labels.max().item()) + 1
        self.support_embeddings_ = self.embed_support(support_images)  # (n_support, d)
        self.support_one_hot_ = F.one_hot(support_labels, n_way).to(self.support_embeddings_.dtype)  # (n_support, n_way)
        return self

    def predict_query(self, query_images: torch.Tensor) -> torch.Tensor:
        support, one_hot = self._fitted("predict_query")
        queries = self.embed_query(query_images, support)
        return attention_log_probs(queries, support, one_hot, self.scale)

    def support_distance(self, query_images: torch.Tensor) -> torch.Tensor:
        """``(n_query,)``: ``1 - max_i cos(f(q), g(x_i))``, one minus the cosine similarity to the
        most similar support embedding, in ``[0, 2]`` (the quantity the attention is built on)."""
        support, _ = self._fitted("support_distance")
        queries = self.embed_query(query_images, support)
        return (1.0 - cosine_similarities(queries, support).max(dim=1).values).clamp(0.0, 2.0)

    def hparams(self) -> dict:
        return {"fce": self.fce, "fce_steps": self.fce_steps, "scale": self.scale}

    def _fitted(self, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.support_embeddings_ is None or self.support_one_hot_ is None:
            raise RuntimeError(f"call fit_support before {caller}")
        return self.support_embeddings_, self.support_one_hot_


def cosine_similarities(queries: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``(n_query, d)`` x ``(n_support, d)`` -> ``(n_query, n_support)`` cosine similarities
    (0 against an all-zero vector)."""
    return F.normalize(queries, dim=-1, eps=1e-8) @ F.normalize(support, dim=-1, eps=1e-8).T


def attention_log_probs(
    queries: torch.Tensor, support: torch.Tensor, support_one_hot: torch.Tensor, scale: float
) -> torch.Tensor:
    """Log-probabilities ``(n_query, n_way)`` of the attention classifier.

    Args:
        queries: ``(n_query, d)`` query embeddings ``f(q)``.
        support: ``(n_support, d)`` support embeddings ``g(x_i)``.
        support_one_hot: ``(n_support, n_way)`` one-hot support labels.
        scale: multiplier of the cosine similarities before the softmax.
    """
    attention = torch.softmax(scale * cosine_similarities(queries, support), dim=1)  # (n_query, n_support)
    probabilities = attention @ support_one_hot  # (n_query, n_way)
    return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()
