"""Transductive refinement of few-shot predictions on embeddings (any backbone).

A clinic diagnoses a batch of cases at once, so the unlabelled batch itself can help adapt the
classifier. Every refiner has one method,
``refine(support (n_support, d), support_labels (n_support,), query (n_query, d), n_way) ->
(n_query, n_way) logits``, on embeddings that the caller has centred and L2-normalised. See
``docs/transductive.md``.

    >>> from medmeta.transductive import create_refiner
    >>> logits = create_refiner("alpha_tim").refine(support, support_labels, query, n_way)  # doctest: +SKIP
"""

from __future__ import annotations

from medmeta.transductive.alpha_tim import AlphaTIM
from medmeta.transductive.base import InductivePrototypes, TransductiveRefiner
from medmeta.transductive.bd_cspn import BDCSPN
from medmeta.transductive.soft_kmeans import SoftKMeans
from medmeta.transductive.tim import TIMGD

REFINERS: dict[str, type[TransductiveRefiner]] = {
    "inductive": InductivePrototypes,
    "soft_kmeans": SoftKMeans,
    "bd_cspn": BDCSPN,
    "tim_gd": TIMGD,
    "alpha_tim": AlphaTIM,
}


def create_refiner(name: str, **kwargs) -> TransductiveRefiner:
    """A refiner by its registry name, with hyperparameters as keyword arguments."""
    try:
        cls = REFINERS[name]
    except KeyError:
        raise ValueError(f"unknown refiner {name!r}; choose one of {', '.join(REFINERS)}") from None
    return cls(**kwargs)


__all__ = [
    "REFINERS",
    "AlphaTIM",
    "BDCSPN",
    "InductivePrototypes",
    "SoftKMeans",
    "TIMGD",
    "TransductiveRefiner",
    "create_refiner",
]
