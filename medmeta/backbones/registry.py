"""Backbones by name, in the manner of timm's ``create_model``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str):
    """Class decorator: make a backbone buildable as ``create_backbone(name, **kwargs)``."""

    def decorator(cls):
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = cls
        cls.registry_name = name
        return cls

    return decorator


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone. Every backbone has ``num_features``, ``forward_features``
    (the feature map) and ``forward`` (``(batch, num_features)`` embeddings)."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(list_backbones())}")
    return _BACKBONES[name](**kwargs)


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)
