"""Meta-learning methods by name: ``create_method("protonet", backbone)``."""

from __future__ import annotations

from torch import nn

_METHODS: dict[str, type] = {}


def register_method(name: str):
    def decorator(cls):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = cls
        cls.registry_name = name
        return cls

    return decorator


def create_method(name: str, backbone: nn.Module, **kwargs):
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(list_methods())}")
    return _METHODS[name](backbone, **kwargs)


def list_methods() -> list[str]:
    return sorted(_METHODS)
