"""Backbones by name, in the manner of timm's ``create_model``."""

from __future__ import annotations

from torch import nn

from medmeta.registry import Registry

BACKBONES = Registry("backbone")
register_backbone = BACKBONES.register


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone. Every backbone has ``num_features``, ``forward_features``
    (the feature map) and ``forward`` (``(batch, num_features)`` embeddings)."""
    return BACKBONES.create(name, **kwargs)


def list_backbones() -> list[str]:
    return BACKBONES.names()
