"""Adaptation heads by name."""

from __future__ import annotations

from medmeta.registry import Registry

HEADS = Registry("head")
register_head = HEADS.register

#: The head that is the method's own adaptation (ProtoNet's prototypes on raw embeddings, MAML's
#: inner loop, ...), always available.
METHOD_HEAD = "method"


def create_head(name: str, **kwargs):
    """Build a registered :class:`~medmeta.heads.base.EmbeddingHead`."""
    return HEADS.create(name, **kwargs)


def list_heads() -> list[str]:
    """Every head name ``--head`` accepts: ``method`` and the registered embedding heads."""
    return [METHOD_HEAD, *HEADS.names()]


def head_key(head: str, transductive: str | None = None) -> str:
    """The name a head's calibration is stored under: ``prototype``, or ``prototype+soft_kmeans``
    with transductive refinement."""
    return head if not transductive else f"{head}+{transductive}"


def embedding_heads() -> list[str]:
    """The registered heads fitted on fixed embeddings (:class:`~medmeta.heads.base.EmbeddingHead`;
    the others adapt the backbone too)."""
    from medmeta.heads.base import EmbeddingHead

    return [name for name in HEADS.names() if issubclass(HEADS.get(name), EmbeddingHead)]
