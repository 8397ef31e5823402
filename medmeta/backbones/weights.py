"""Starting a backbone from weights a user brings (``--backbone-weights``).

The source is a file, either safetensors or a PyTorch state dict (read with
``torch.load(..., weights_only=True)``, which refuses pickled Python objects), or the word
``pretrained``: the library's own download, for ``torchvision:`` and ``timm:`` backbones.

Keys are matched as the library names them (``conv1.weight``), or as the backbone does
(``model.conv1.weight``: a state dict saved from a medmeta backbone); a ``module.`` prefix
(``DataParallel``) is dropped. Entries of the classifier the wrapper removed (``fc.*``) are
ignored and reported; any other entry the backbone lacks, any weight the file lacks, and any
shape that differs are refused with a :class:`WeightsError` naming the file.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from medmeta.backbones.external import BackboneError, ExternalBackbone, first_line
from medmeta.errors import MedmetaError

PRETRAINED = "pretrained"
# a checkpoint that wraps its state dict under one of these keys is unwrapped
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_SHOWN = 3  # keys quoted in a refusal
# how torch.load(weights_only=True) names a pickled object it refuses to build
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


class WeightsError(MedmetaError, ValueError):
    """A weights file cannot be read or does not fit the backbone; the message names the file."""


@dataclass
class WeightsReport:
    """What :func:`load_backbone_weights` did: tensors loaded, classifier entries ignored."""

    source: str
    loaded: int
    ignored: list[str] = field(default_factory=list)

    def notes(self) -> list[str]:
        """Lines for the user (the ignored classifier entries)."""
        if not self.ignored:
            return []
        return [
            f"{self.source}: ignored {len(self.ignored)} classifier entries ({_listed(self.ignored)}): "
            "the backbone's embeddings are its pooled features"
        ]


def load_backbone_weights(backbone: nn.Module, source: str | os.PathLike) -> WeightsReport:
    """Load ``source`` (a file, or :data:`PRETRAINED`) into ``backbone``; refuses with a
    :class:`WeightsError` (or a :class:`BackboneError` for ``pretrained``) and leaves the
    backbone unchanged when anything does not fit."""
    if isinstance(source, str) and source == PRETRAINED:
        if not isinstance(backbone, ExternalBackbone):
            raise BackboneError(
                f"--backbone-weights {PRETRAINED}: {_name(backbone)} has no library weights; "
                "name a torchvision:MODEL or timm:MODEL backbone, or give a file"
            )
        return apply_state_dict(backbone, backbone.pretrained_state_dict(), f"{backbone.name} (pretrained)")
    return apply_state_dict(backbone, read_state_dict(source), str(source))


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` mapping in a safetensors or PyTorch file (on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: {'not a file' if path.exists() else 'no such weights file'}")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _REFUSED_GLOBAL.search(str(exc))
        if refused:
            raise WeightsError(
                f"{path}: refused: it holds Python objects besides tensors ({refused.group(1)}), which "
                "torch.load(weights_only=True) does not run; save the model's state_dict() instead, or convert it to safetensors"
            ) from None
        raise WeightsError(f"{path}: neither a safetensors file nor a PyTorch state dict (not a readable pickle)") from None
    except Exception as exc:
        raise WeightsError(f"{path}: neither a safetensors file nor a PyTorch state dict ({first_line(exc)})") from None
    return _tensors(data, path)


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte header length, then the JSON header."""
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _tensors(data: Any, path: Path) -> dict[str, torch.Tensor]:
    """A state dict, unwrapped from ``{"state_dict": ...}``-like checkpoints."""
    if isinstance(data, Mapping) and not _all_tensors(data):
        inner = [data[k] for k in WRAPPER_KEYS if isinstance(data.get(k), Mapping)]
        if inner:
            data = inner[0]
    if not isinstance(data, Mapping) or not data:
        raise WeightsError(f"{path}: not a state dict (a mapping of names to tensors), got {type(data).__name__}")
    wrong = [str(k) for k, v in data.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if wrong:
        raise WeightsError(f"{path}: not a state dict: {len(wrong)} entries are not named tensors ({_listed(wrong)})")
    return dict(data)


def _all_tensors(data: Mapping) -> bool:
    return all(torch.is_tensor(v) for v in data.values())


def apply_state_dict(backbone: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> WeightsReport:
    """Match ``tensors`` to the backbone's state dict (see the module doc) and load them."""
    own = backbone.state_dict()
    prefix = getattr(backbone, "weights_prefix", "")
    classifier = tuple(getattr(backbone, "classifier", ()))
    matched: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for key, value in tensors.items():
        target = _target(key, own, prefix)
        if target is not None:
            if tuple(value.shape) != tuple(own[target].shape):
                raise WeightsError(
                    f"{source}: {key} has shape {tuple(value.shape)} but {_name(backbone)} needs {tuple(own[target].shape)} "
                    "(weights of another model, or of other model options?)"
                )
            matched[target] = value
        elif any(_under(key.removeprefix("module."), c) for c in classifier):
            ignored.append(key)
        else:
            unknown.append(key)
    missing = [k for k in own if k not in matched and not _optional(k, backbone)]
    if missing:
        example = next((k for k in tensors if k.endswith("weight")), next(iter(tensors), ""))
        raise WeightsError(
            f"{source}: lacks {len(missing)} of the {len(own)} tensors of {_name(backbone)} ({_listed(missing, prefix)}); "
            f"its keys look like {example!r}: a checkpoint of another architecture, or keys that need renaming (see docs/backbones.md)"
        )
    if unknown:
        raise WeightsError(
            f"{source}: has {len(unknown)} entries that {_name(backbone)} does not have ({_listed(unknown)}): "
            "a checkpoint of another architecture or variant?"
        )
    backbone.load_state_dict({**own, **matched}, strict=True)
    return WeightsReport(source=source, loaded=len(matched), ignored=ignored)


def _target(key: str, own: Mapping[str, torch.Tensor], prefix: str) -> str | None:
    """The backbone's key for a file's ``key``, or ``None``."""
    for candidate in (key, key.removeprefix("module.")):
        for name in (candidate, prefix + candidate):
            if name in own:
                return name
    return None


def _under(key: str, module: str) -> bool:
    return bool(module) and (key == module or key.startswith(module + "."))


def _optional(key: str, backbone: nn.Module) -> bool:
    """Entries a weights file need not have: the wrapper's normalisation constants and
    BatchNorm's batch counters (older checkpoints have none)."""
    return key in getattr(backbone, "wrapper_keys", ()) or key.endswith("num_batches_tracked")


def _name(backbone: nn.Module) -> str:
    return str(getattr(backbone, "name", None) or getattr(backbone, "registry_name", None) or type(backbone).__name__)


def _listed(keys: list[str], prefix: str = "") -> str:
    shown = [k.removeprefix(prefix) if prefix else k for k in keys[:_SHOWN]]
    return ", ".join(shown) + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")
