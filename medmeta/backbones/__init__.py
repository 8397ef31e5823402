"""Feature extractors, built by name: ``create_backbone("conv4", in_channels=3)``, or a model of
another library: ``create_backbone("timm:resnet18", in_channels=1)`` (optional extras)."""

from medmeta.backbones import conv4, resnet12  # noqa: F401  (registration)
from medmeta.backbones.registry import create_backbone, is_external, list_backbones, register_backbone

__all__ = ["create_backbone", "is_external", "list_backbones", "register_backbone"]
