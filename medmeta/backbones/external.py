"""Backbones from other libraries, by name: ``torchvision:<model>`` and ``timm:<model>``.

:class:`ExternalBackbone` wraps the library's classification model with its classifier
removed, so that ``forward`` gives the pooled embeddings ``(batch, num_features)`` that every
method uses. It feeds the model what it was trained on: a grayscale image (``in_channels=1``)
is repeated to three channels, then the model's own mean/std normalisation is applied (timm:
the model's ``pretrained_cfg``; torchvision: ImageNet's; either overridden by the ``mean`` and
``std`` arguments). ``mean`` and ``std`` are buffers, so a checkpoint carries them.

Building never reads a file nor the network: weights come from ``--backbone-weights`` (see
:mod:`medmeta.backbones.weights`) or from a checkpoint. The libraries are optional extras,
imported when such a backbone is named; a missing or broken one is a :class:`MissingLibraryError`
naming the extra to install.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from medmeta.errors import MedmetaError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Arguments a user may be tempted to pass, and why the wrapper takes them otherwise.
_WEIGHTS_ARE_SEPARATE = (
    "weights are never read when a backbone is built: give them with --backbone-weights FILE or --backbone-weights pretrained"
)
REFUSED_OPTIONS = {
    "norm_kind": "keeps the normalisation layers its weights were trained with (norm_kind is an option of conv4 and resnet12)",
    "num_classes": "has its classifier removed: its embeddings are the pooled features",
    "in_chans": "takes RGB; a grayscale image (--channels 1) is repeated to three channels",
    "pretrained": _WEIGHTS_ARE_SEPARATE,
    "weights": _WEIGHTS_ARE_SEPARATE,
    "checkpoint_path": _WEIGHTS_ARE_SEPARATE,
    "pretrained_cfg": _WEIGHTS_ARE_SEPARATE,
    "pretrained_cfg_overlay": _WEIGHTS_ARE_SEPARATE,
}


class BackboneError(MedmetaError, ValueError):
    """An external backbone cannot be named, built or given its weights; one clear line."""


class MissingLibraryError(BackboneError):
    """The library of an external backbone is not installed, or cannot be imported."""


@dataclass
class ModelParts:
    """What a library adapter hands the wrapper.

    Attributes:
        model: the library's model, classifier removed: ``model(x)`` is ``(batch, num_features)``.
        num_features: size of the embeddings.
        classifier: state-dict key prefixes of the removed classifier (ignored in weights files).
        mean, std: the model's input normalisation (three values each).
    """

    model: nn.Module
    num_features: int
    classifier: tuple[str, ...]
    mean: Sequence[float]
    std: Sequence[float]


class ExternalBackbone(nn.Module, ABC):
    """A library's model as a medmeta backbone (subclasses: one per library).

    Args:
        model_name: the library's name of the model, e.g. ``resnet50`` (timm also takes a
            pretrained tag, ``resnet50.a1_in1k``, which picks that checkpoint's normalisation).
        in_channels: 1 (repeated to RGB) or 3.
        spatial_dims: must be 2 (these are image models).
        mean, std: input normalisation, three values each (or one, used for all three);
            default: the model's own.
        **model_kwargs: passed to the library's constructor, e.g. ``drop_path_rate`` or timm's
            ``dynamic_img_size=True`` (a ViT at medmeta's image size).

    ``forward`` maps ``(batch, in_channels, H, W)`` in ``[0, 1]`` to ``(batch, num_features)``.
    """

    library: ClassVar[str]
    extra: ClassVar[str]  # the pip extra of medmeta that installs the library
    # state-dict keys of the wrapper: the model's own under ``model.``; mean/std are the wrapper's
    weights_prefix: ClassVar[str] = "model."
    wrapper_keys: ClassVar[tuple[str, ...]] = ("mean", "std")

    def __init__(
        self,
        model_name: str,
        in_channels: int = 3,
        spatial_dims: int = 2,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        **model_kwargs: Any,
    ):
        super().__init__()
        self.name = f"{self.library}:{model_name}"
        if in_channels not in (1, 3):
            raise BackboneError(f"{self.name} takes 1 (grayscale, repeated to RGB) or 3 input channels, got in_channels={in_channels!r}")
        if spatial_dims != 2:
            raise BackboneError(f"{self.name} is a 2D image model; spatial_dims={spatial_dims!r} needs conv4 or resnet12")
        for key in model_kwargs:
            if key in REFUSED_OPTIONS:
                raise BackboneError(f"{self.name}: option {key!r} is not taken: the backbone {REFUSED_OPTIONS[key]}")
        self.model_name, self.in_channels, self.model_kwargs = model_name, int(in_channels), dict(model_kwargs)
        try:
            parts = self.build(model_name, dict(model_kwargs))
        except MedmetaError:
            raise
        except Exception as exc:  # the library's own refusal (unknown argument, bad value)
            raise BackboneError(f"cannot build {self.name} with {model_kwargs}: {first_line(exc)}") from None
        self.model = parts.model
        self.num_features = int(parts.num_features)
        self.classifier = tuple(parts.classifier)
        self.register_buffer("mean", _channel_values(self.name, "mean", parts.mean if mean is None else mean))
        self.register_buffer("std", _channel_values(self.name, "std", parts.std if std is None else std))
        if not bool((self.std > 0).all()):
            raise BackboneError(f"{self.name}: std must be positive, got {self.std.flatten().tolist()}")

    # ---- the library ----------------------------------------------------------------------------
    @classmethod
    def import_library(cls) -> ModuleType:
        """The library's module; :class:`MissingLibraryError` naming the extra when it cannot load."""
        return import_library(cls.library, cls.extra)

    @classmethod
    @abstractmethod
    def model_names(cls) -> list[str]:
        """Names of the library's classification models."""

    @classmethod
    def check_model_name(cls, model_name: str) -> None:
        """Refuse a name the library does not know, suggesting close ones."""
        if not cls.is_model(model_name):
            close = difflib.get_close_matches(model_name, cls.model_names(), n=3)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise BackboneError(f"{cls.library} has no classification model {model_name!r}{hint} (see docs/backbones.md)")

    @classmethod
    def is_model(cls, model_name: str) -> bool:
        return model_name in cls.model_names()

    @abstractmethod
    def build(self, model_name: str, model_kwargs: dict[str, Any]) -> ModelParts:
        """The library's model without its classifier (never downloads)."""

    @abstractmethod
    def has_pretrained(self) -> bool:
        """Whether the library publishes pretrained weights for this model (checked offline)."""

    @abstractmethod
    def pretrained_state_dict(self) -> dict[str, torch.Tensor]:
        """The library's own pretrained weights (downloaded, or from its cache), keyed as the
        library names them; called only for ``--backbone-weights pretrained``."""

    # ---- forward --------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` images -> what the model was trained on: RGB, normalised."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, *x.shape[2:])
        elif x.shape[1] != 3:
            raise ValueError(f"{self.name} takes 1 or 3 input channels, got a batch of shape {tuple(x.shape)}")
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(self.prepare(x))
        if isinstance(out, (tuple, list)):  # e.g. torchvision's Inception outputs with aux logits
            out = out[0]
        return out.flatten(1)

    @abstractmethod
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The model's last feature map (or, for a transformer, its tokens)."""

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_features={self.num_features}"


def _channel_values(name: str, what: str, values: Sequence[float] | float) -> torch.Tensor:
    """Three per-channel values as a ``(1, 3, 1, 1)`` tensor (one value is used for all three)."""
    try:
        flat = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    except (TypeError, ValueError):
        raise BackboneError(f"{name}: {what} must be one or three numbers, got {values!r}") from None
    if len(flat) == 1:
        flat = flat * 3
    if len(flat) != 3:
        raise BackboneError(f"{name}: {what} must be one or three numbers, got {values!r}")
    return torch.tensor(flat, dtype=torch.float32).view(1, 3, 1, 1)


def first_line(exc: BaseException) -> str:
    """``TypeName: first line of the message`` of an exception from a library."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def import_library(library: str, extra: str) -> ModuleType:
    """Import ``library``; a clear :class:`MissingLibraryError` when it is absent or broken."""
    try:
        return importlib.import_module(library)
    except ModuleNotFoundError as exc:
        if exc.name == library:
            raise MissingLibraryError(
                f"{library}:MODEL backbones need {library}, which is not installed: pip install 'medmeta[{extra}]', "
                f"after the torchvision build that matches torch {torch.__version__} (see docs/backbones.md)"
            ) from None
        raise MissingLibraryError(f"{library} is installed but cannot be imported ({first_line(exc)}); pip install 'medmeta[{extra}]'") from None
    except Exception as exc:  # e.g. a torchvision built for another torch: "operator torchvision::nms does not exist"
        raise MissingLibraryError(
            f"{library} is installed but cannot be imported ({first_line(exc)}); it must be the build that matches "
            f"torch {torch.__version__} (see docs/backbones.md)"
        ) from None


def library_problem(library: str) -> str | None:
    """Why backbones of ``library`` cannot be used here, or ``None`` when they can (for skips)."""
    try:
        external_class(library).import_library()
    except BackboneError as exc:
        return str(exc)
    return None


# ---- names ------------------------------------------------------------------------------------
def external_class(library: str) -> type[ExternalBackbone]:
    """The wrapper class of ``library`` (``torchvision`` or ``timm``)."""
    from medmeta.backbones.timm_backbone import TimmBackbone
    from medmeta.backbones.torchvision_backbone import TorchvisionBackbone

    classes: dict[str, type[ExternalBackbone]] = {"torchvision": TorchvisionBackbone, "timm": TimmBackbone}
    if library not in classes:
        raise BackboneError(f"unknown backbone library {library!r}; external backbones are {' or '.join(f'{n}:MODEL' for n in classes)}")
    return classes[library]


EXTERNAL_FORMS = ("torchvision:MODEL", "timm:MODEL")


def external_factory(name: str) -> Callable[..., ExternalBackbone]:
    """``"timm:resnet50"`` -> a constructor of that backbone (keyword arguments as
    :class:`ExternalBackbone` takes them). Imports the library and checks the model name;
    builds nothing."""
    library, _, model_name = name.partition(":")
    cls = external_class(library)
    if not model_name:
        raise BackboneError(f"backbone {name!r} names no model; write {library}:MODEL, e.g. {library}:resnet18")
    cls.import_library()
    cls.check_model_name(model_name)
    return functools.partial(cls, model_name)
