"""Embedding normalisation learnt at training time: centring on the meta-train mean, then L2."""

from __future__ import annotations

import math
from typing import Any

import torch

from medmeta.errors import MedmetaError

#: The normalisations a checkpoint may store.
NORMALISATIONS = ("none", "center_l2")


class EmbeddingNormaliser:
    """Wang et al. 2019 (SimpleShot), "CL2N": subtract the mean embedding of the meta-train
    images, then divide by the L2 norm. Centring removes the direction every embedding shares
    (which the rare conditions share too, so it carries no evidence); L2 removes the norm, which
    tracks contrast and acquisition more than the condition.

    ``kind="none"`` leaves embeddings unchanged. ``fit`` takes ``(n, d)`` meta-train embeddings
    and sets ``mean_`` ``(d,)``; ``__call__`` maps ``(n, d)`` to ``(n, d)``.
    """

    def __init__(self, kind: str = "center_l2"):
        if kind not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {kind!r}")
        self.kind = kind
        self.mean_: torch.Tensor | None = None

    def fit(self, embeddings: torch.Tensor) -> "EmbeddingNormaliser":
        self.mean_ = embeddings.detach().double().mean(dim=0).cpu()
        return self

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return embeddings
        if self.mean_ is None:
            raise RuntimeError("call fit before normalising")
        centred = embeddings - self.mean_.to(embeddings.device, embeddings.dtype)
        return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": None if self.mean_ is None else [float(v) for v in self.mean_]}

    @classmethod
    def from_dict(cls, data: Any, num_features: int | None = None) -> "EmbeddingNormaliser":
        """Rebuild from :meth:`to_dict` (a checkpoint's sidecar), checking kind, length
        (``num_features`` when known) and that every value is a finite number."""
        if not isinstance(data, dict) or data.get("kind") not in NORMALISATIONS:
            raise MedmetaError(f"embedding normalisation must name one of {', '.join(NORMALISATIONS)}")
        out = cls(data["kind"])
        mean = data.get("mean")
        if out.kind == "none":
            return out
        if not isinstance(mean, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in mean
        ):
            raise MedmetaError("embedding normalisation mean must be a list of finite numbers")
        if num_features is not None and len(mean) != num_features:
            raise MedmetaError(f"embedding normalisation mean has {len(mean)} values for {num_features} features")
        out.mean_ = torch.tensor(mean, dtype=torch.float64)
        return out
