"""Meta-learning methods by name: ``create_method("protonet", backbone)``."""

from __future__ import annotations

from torch import nn

from medmeta.registry import Registry

METHODS = Registry("method")
register_method = METHODS.register


def create_method(name: str, backbone: nn.Module, **kwargs):
    """Build a registered :class:`~medmeta.methods.base.MetaLearner` around ``backbone``."""
    return METHODS.create(name, backbone, **kwargs)


def list_methods() -> list[str]:
    return METHODS.names()
