"""Adaptation heads: what is fitted on the support at adaptation time (``--head``).

``method`` is the trained method's own adaptation; the others are fitted on the backbone's
embeddings, normalised by the run's :class:`EmbeddingNormaliser`, whatever the method:

- ``prototype``: nearest class mean (SimpleShot);
- ``logistic``: multinomial logistic regression (Tian et al. 2020);
- ``finetune``: the backbone's last block and a prototype-initialised classifier fine-tuned on
  the support with augmentation (P>M>F, Hu et al. 2022).
"""

from medmeta.heads import finetune, logistic, prototype  # noqa: F401 - registers the heads
from medmeta.heads.base import BackboneHead, EmbeddingHead
from medmeta.heads.learner import HeadLearner, adapting_learner
from medmeta.heads.normalise import NORMALISATIONS, EmbeddingNormaliser
from medmeta.heads.registry import HEADS, METHOD_HEAD, create_head, embedding_heads, head_key, list_heads

__all__ = [
    "HEADS", "METHOD_HEAD", "NORMALISATIONS", "BackboneHead", "EmbeddingHead", "EmbeddingNormaliser", "HeadLearner",
    "adapting_learner", "create_head", "embedding_heads",
    "head_key", "list_heads",
]
