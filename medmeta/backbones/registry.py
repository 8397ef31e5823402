"""Backbones by name, in the manner of timm's ``create_model``.

Built-in backbones are registered classes (``conv4``, ``resnet12``); a name with a library
prefix, ``torchvision:<model>`` or ``timm:<model>``, resolves to a wrapper of that library's
model (:mod:`medmeta.backbones.external`), so checkpoints rebuild external backbones by name too.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from medmeta.registry import Registry

EXTERNAL_SEPARATOR = ":"


def is_external(name: str) -> bool:
    """Whether ``name`` names a model of another library (``torchvision:resnet18``)."""
    return EXTERNAL_SEPARATOR in name


class BackboneRegistry(Registry):
    """The backbone registry: registered classes, plus ``library:model`` names resolved on demand."""

    def get(self, name: str) -> Callable[..., Any]:  # type: ignore[override]
        """The constructor of backbone ``name``; a ``ValueError`` (for external names a
        :class:`~medmeta.backbones.external.BackboneError`) when there is none."""
        if is_external(name):
            from medmeta.backbones.external import external_factory

            return external_factory(name)
        try:
            return super().get(name)
        except ValueError:
            from medmeta.backbones.external import EXTERNAL_FORMS

            raise ValueError(
                f"unknown backbone {name!r}; choose from {', '.join(self.names())}, or a model of another library: "
                f"{' or '.join(EXTERNAL_FORMS)}"
            ) from None


BACKBONES = BackboneRegistry("backbone")
register_backbone = BACKBONES.register


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Build a backbone by name (``conv4``, ``resnet12``, ``torchvision:<model>``,
    ``timm:<model>``). Every backbone has ``num_features``, ``forward_features`` (the feature
    map) and ``forward`` (``(batch, num_features)`` embeddings). Building never downloads."""
    return BACKBONES.create(name, **kwargs)


def list_backbones() -> list[str]:
    """The registered (built-in) backbones; external ones are named ``library:model``."""
    return BACKBONES.names()
