"""Choosing the compute device, once, at the edges (training loop and CLI)."""

from __future__ import annotations

import torch

from medmeta.errors import MedmetaError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; asking for ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedmetaError("--device cuda was asked for, but no CUDA GPU is available (use --device auto or cpu)")
    if name == "cpu" or name.startswith("cuda"):
        return torch.device(name)
    raise MedmetaError(f"unknown device {name!r}; use auto, cpu or cuda")
