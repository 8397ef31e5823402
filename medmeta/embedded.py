"""Adapting on embeddings: each scan through the backbone once, however many tasks it is in.

A learner whose adaptation works on embeddings (ProtoNet, and every embedding head's
:class:`~medmeta.heads.HeadLearner`: it has ``embed``, ``fit_embedded`` and
``predict_embedded``) needs the backbone only to embed the scans; fitting the support and
scoring the cases are then cheap. In evaluation mode a scan's embedding does not depend on the
other scans of its batch, so a scan that appears in many episodes (val and test classes have a
few hundred scans, drawn into hundreds of episodes) can be embedded once:

- :class:`EmbeddingCache` embeds scans of an :class:`~medmeta.data.store.ImageStore` on first
  use and keeps their embeddings;
- :class:`OnEmbeddings` presents such a learner as one whose "images" are embeddings, so the
  episode head and the leave-one-out refits run on it unchanged.

Validating 300 val-class episodes of 40 scans then costs one backbone pass over the few hundred
val scans instead of 12,000 (:func:`medmeta.evaluation.run_episodes`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

#: What a learner needs to adapt on embeddings.
EMBEDDING_API = ("embed", "fit_embedded", "predict_embedded")

#: Scans per backbone pass when embedding many: 256 images of 3 x 64 x 64 values, fewer when a
#: scan holds more values, so that one pass's activations stay near that size (a 28^3 volume:
#: 143 per pass; 64^3: 12). 256 volumes of 28^3 through a 3D conv4-32 took 3.6 GiB.
EMBED_BATCH = 256
EMBED_BATCH_VALUES = EMBED_BATCH * 3 * 64 * 64


def embed_batch_size(scan_values: int) -> int:
    """Scans embedded per backbone pass for scans of ``scan_values`` values each (C x H x W, or
    C x D x H x W): :data:`EMBED_BATCH` at most, at least 1."""
    return max(1, min(EMBED_BATCH, EMBED_BATCH_VALUES // max(1, int(scan_values))))


def adapts_on_embeddings(learner) -> bool:
    """Whether ``learner`` fits and predicts on embeddings (see the module docstring)."""
    return all(hasattr(learner, name) for name in EMBEDDING_API)


class OnEmbeddings:
    """A learner that adapts on embeddings, seen as one whose "images" are its embeddings
    ``(n, d)``: ``fit_support``, ``predict_with_distance``, ``predict_query``,
    ``support_distance`` and ``correct_held_out_logits`` as the learner's image interface has
    them (and no ``embed``, so leave-one-out refits it directly on the embeddings)."""

    def __init__(self, learner):
        self.learner = learner

    def embed_all(self, images: torch.Tensor, device, batch_size: int) -> torch.Tensor:
        """``(n, C, H, W)`` images -> ``(n, d)`` embeddings, ``batch_size`` at a time on ``device``."""
        parts = [self.learner.embed(images[s : s + batch_size].to(device)) for s in range(0, len(images), batch_size)]
        return torch.cat(parts) if parts else self.learner.embed(images.to(device))

    def fit_support(self, support: torch.Tensor, labels: torch.Tensor) -> "OnEmbeddings":
        self.learner.fit_embedded(support, labels)
        return self

    def predict_with_distance(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.learner.predict_embedded(query)

    def predict_query(self, query: torch.Tensor) -> torch.Tensor:
        return self.learner.predict_embedded(query)[0]

    def support_distance(self, query: torch.Tensor) -> torch.Tensor:
        return self.learner.predict_embedded(query)[1]

    def correct_held_out_logits(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.learner.correct_held_out_logits(logits, labels)


class EmbeddingCache:
    """Embeddings of a store's scans by ``learner`` (in evaluation mode, without gradients),
    computed on first use, ``batch_size`` scans at a time, and kept by record key.

    Valid while the learner's weights do not change: make one per evaluation.
    """

    def __init__(self, learner, store, device: torch.device | str, batch_size: int | None = None):
        """``batch_size``: scans per backbone pass [default: :func:`embed_batch_size` of the
        store's scans]."""
        self.learner = learner
        self.store = store
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._embeddings: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._embeddings)

    @torch.no_grad()
    def stack(self, records: Sequence) -> torch.Tensor:
        """``(len(records), d)`` embeddings of ``records``, on the cache's device."""
        missing = list({r.key: r for r in records if r.key not in self._embeddings}.values())
        if missing and self.batch_size is None:
            self.batch_size = embed_batch_size(self.store.get(missing[0]).numel())
        for start in range(0, len(missing), self.batch_size or 1):
            batch = missing[start : start + self.batch_size]
            embedded = self.learner.embed(self.store.stack(batch).to(self.device))
            self._embeddings.update({r.key: e for r, e in zip(batch, embedded)})
        return torch.stack([self._embeddings[r.key] for r in records])
