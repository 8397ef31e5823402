"""Feature extractors, built by name: ``create_backbone("conv4", in_channels=3)``."""

from medmeta.backbones import conv4, resnet12  # noqa: F401  (registration)
from medmeta.backbones.registry import create_backbone, list_backbones, register_backbone

__all__ = ["create_backbone", "list_backbones", "register_backbone"]
