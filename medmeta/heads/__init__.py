"""Adaptation heads: what is fitted on the support at adaptation time (``--head``).

``method`` is the trained method's own adaptation; the others are fitted on the backbone's
embeddings, normalised by the run's :class:`EmbeddingNormaliser`, whatever the method:

- ``prototype``: nearest class mean (SimpleShot);
- ``logistic``: multinomial logistic regression (Tian et al. 2020).
"""

from medmeta.heads import logistic, prototype  # noqa: F401 - registers the heads
from medmeta.heads.base import EmbeddingHead
from medmeta.heads.learner import HeadLearner
from medmeta.heads.normalise import NORMALISATIONS, EmbeddingNormaliser
from medmeta.heads.registry import HEADS, METHOD_HEAD, create_head, head_key, list_heads

__all__ = [
    "HEADS", "METHOD_HEAD", "NORMALISATIONS", "EmbeddingHead", "EmbeddingNormaliser", "HeadLearner", "create_head",
    "head_key", "list_heads",
]
