"""Validation of a :class:`TrainConfig`: types, ranges, names and the method's options.

Every refusal is a :class:`ConfigError` (a :class:`MedmetaError`, and a ``ValueError``) whose
``field`` names the setting, so the command line can say which option or which key of a
``--config`` file is wrong; calibration settings raise :class:`CalibrationSettingError`, also a
:class:`CalibrationError`. Registries (which import torch) are imported only when checking.
"""

from __future__ import annotations

import math
import numbers
import os
import types
import typing
from pathlib import Path
from dataclasses import fields
from typing import Any, Callable

from medmeta.errors import CalibrationError
from medmeta.training.config import ConfigError, TrainConfig

PATH_FIELDS = ("protocol", "out", "init_from", "backbone_weights", "cache_dir")


class CalibrationSettingError(ConfigError, CalibrationError):
    """An invalid target coverage, conformal score or referral share."""


# ---- types -----------------------------------------------------------------------------------
def field_types() -> dict[str, Any]:
    """``{field: type hint}`` of :class:`TrainConfig`, resolved."""
    return typing.get_type_hints(TrainConfig)


def matches_type(value: Any, hint: Any, path: bool = False) -> bool:
    """Whether ``value`` fits the type hint ``hint`` (``int`` refuses ``True``; ``float``
    takes integers; a path field also takes an ``os.PathLike``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, a, path) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(matches_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str) or (path and isinstance(value, os.PathLike))
    return isinstance(value, hint)


def describe_type(hint: Any) -> str:
    """``int | None`` -> ``"an integer (or null)"``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" (or null)" if type(None) in args else "")
    if origin is list:
        return f"a list of {describe_type(args[0]).split(' ', 1)[1]}s"
    if origin is dict:
        return "a mapping of names to values"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a text"}.get(hint, hint.__name__)


def check_types(config: TrainConfig) -> None:
    hints = field_types()
    for spec in fields(config):
        value = getattr(config, spec.name)
        if not matches_type(value, hints[spec.name], path=spec.name in PATH_FIELDS):
            raise ConfigError(f"{spec.name} must be {describe_type(hints[spec.name])}, got {value!r}", spec.name)


# ---- values ----------------------------------------------------------------------------------
MAX_IMAGE_SIZE = 1024  # as medmeta.data.reading.MAX_IMAGE_SIZE (a test keeps them equal; that module loads torch)
#: ``{spatial_dims: default}`` of ``image_size`` and ``channels`` when neither the config nor
#: the protocol sets them (28 voxels: the native size of MedMNIST 3D)
DEFAULT_IMAGE_SIZE = {2: 64, 3: 28}
DEFAULT_CHANNELS = {2: 3, 3: 1}
#: ``{spatial_dims: {field: default}}`` of the training schedule, for the fields a config leaves
#: unset (``None``). Volumes get a shorter one: the images' recipe (20 epochs, 3,200 episodes)
#: takes about 2 h on ct-fracture-3d on 2 CPU cores, this one 7-12 min; their val classes
#: saturate (0.99+), so a longer schedule cannot be chosen on them (docs/benchmarks.md, "Volumes").
DEFAULT_SCHEDULE = {
    2: {"episodes": 3200, "pretrain_epochs": 20, "val_episodes": 300, "calibration_episodes": 100, "tuning_episodes": None},
    3: {"episodes": 600, "pretrain_epochs": 5, "val_episodes": 60, "calibration_episodes": 50, "tuning_episodes": 20},
}
#: backbone arguments volumes default to (the user's ``backbone_kwargs`` win): a 3D conv4 of
#: width 32 costs 0.56 s per 3-way 5-shot 15-query episode at 28^3 on 2 cores
VOLUME_BACKBONE_DEFAULTS: dict[str, dict] = {"conv4": {"hidden": 32}}


def _at_least(bound: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= bound), f"must be at least {bound}"


def _positive() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > 0), "must be positive"


# field -> (test, requirement); ``None`` values of optional fields are not tested
VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "way": _at_least(2),
    "shot": _at_least(1),
    "query": _at_least(1),
    "episodes": _at_least(0),
    "image_size": ((lambda v: 16 <= v <= MAX_IMAGE_SIZE), f"must be at least 16 (and at most {MAX_IMAGE_SIZE})"),
    "channels": ((lambda v: v in (1, 3)), "must be 1 (grayscale) or 3 (RGB)"),
    "spatial_dims": ((lambda v: v in (2, 3)), "must be 2 (images) or 3 (volumes)"),
    "meta_batch": _at_least(1),
    "lr": _positive(),
    "backbone_lr": ((lambda v: v >= 0), "must be 0 (frozen) or positive"),
    "grad_clip": _positive(),
    "weight_decay": _at_least(0),
    "lr_step": _at_least(1),
    "lr_gamma": _positive(),
    "ema_decay": ((lambda v: 0 <= v < 1), "must be at least 0 (no average) and below 1"),
    "pretrain_epochs": _at_least(0),
    "pretrain_lr": _positive(),
    "pretrain_batch_size": _at_least(1),
    "augment_grayscale": ((lambda v: 0 <= v <= 1), "must be a probability in [0, 1]"),
    "pretrain_label_smoothing": ((lambda v: 0 <= v < 1), "must be at least 0 and below 1"),
    "pretrain_contrastive": ((lambda v: 0 <= v <= 100), "must be between 0 and 100"),
    "pretrain_generations": ((lambda v: 1 <= v <= 10), "must be between 1 and 10"),
    "val_interval": _at_least(1),
    "val_episodes": _at_least(1),
    "calibration_episodes": _at_least(1),
    "tuning_episodes": _at_least(0),
    "seed": _at_least(0),
    "max_minutes": _positive(),
}


def check_values(config: TrainConfig) -> None:
    for name, hint in field_types().items():
        value = getattr(config, name)
        if matches_type(1.5, hint) and value is not None and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}", name)
    for name, (test, requirement) in VALUE_RULES.items():
        value = getattr(config, name)
        if value is not None and not test(value):
            raise ConfigError(f"{name} {requirement}, got {value!r}", name)
    if config.pretrain_generations > 1 and (config.init_from or config.backbone_weights is not None):
        raise ConfigError(
            "--pretrain-generations restarts the backbone from fresh weights each generation; it cannot be combined "
            "with --init-from or --backbone-weights",
            "pretrain_generations",
        )
    if config.train_shots and min(config.train_shots) < 1:
        raise ConfigError(f"train_shots must be positive, got {config.train_shots}", "train_shots")
    device = config.device
    if not (device in ("auto", "cpu") or device == "cuda" or device.startswith("cuda:")):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda", "device")
    from medmeta.precision import PRECISIONS

    if config.precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {config.precision!r}; use {', '.join(PRECISIONS)}", "precision")
    if config.workers is not None and config.workers < 0:
        raise ConfigError(f"workers must be 0 or more, got {config.workers}", "workers")
    if not config.cache_in_memory and not config.cache_dir:
        raise ConfigError(
            "--no-cache-in-memory keeps the decoded scans only in the cache folder: give --cache-dir", "cache_in_memory"
        )
    if config.cache_dir and Path(config.cache_dir).exists() and not Path(config.cache_dir).is_dir():
        raise ConfigError(f"--cache-dir {config.cache_dir}: not a folder", "cache_dir")


def check_names(config: TrainConfig) -> None:
    """Method, backbone and augmentation against their registries (imported here: torch). An
    external backbone (``torchvision:MODEL``, ``timm:MODEL``) needs its library and the model."""
    from medmeta.backbones.registry import BACKBONES
    from medmeta.data.augment import AUGMENTATIONS
    from medmeta.methods import list_methods

    for name, known in (("method", list_methods()), ("augment", AUGMENTATIONS)):
        value = getattr(config, name)
        if value not in known:
            raise ConfigError(f"unknown {name} {value!r}; choose from {', '.join(known)}", name)
    try:
        BACKBONES.get(config.backbone)
    except ValueError as exc:
        raise ConfigError(str(exc), "backbone") from None


def check_calibration_settings(config: Any) -> None:
    """Refuse invalid conformal/referral settings before any training time is spent."""
    from medmeta.training.names import CONFORMAL_SCORES

    if config.conformal_score not in CONFORMAL_SCORES:
        raise CalibrationSettingError(
            f"unknown conformal score {config.conformal_score!r}; choose from {', '.join(CONFORMAL_SCORES)}", "conformal_score"
        )
    if not 0.0 < config.coverage < 1.0:
        raise CalibrationSettingError(f"target coverage must be between 0 and 1 (exclusive), got {config.coverage}", "coverage")
    if not 0.0 <= config.refer_share < 1.0:
        raise CalibrationSettingError(f"the share of cases to refer must be in [0, 1), got {config.refer_share}", "refer_share")


def check_learner(config: TrainConfig) -> Any:
    """Build the learner once (torch's random state is restored afterwards) to check the method
    and backbone options, and that ``backbone_lr == 0`` leaves something to train; returns it."""
    import torch

    from medmeta.training.build import build_learner

    with torch.random.fork_rng(devices=[]):
        learner = build_learner(config)
    if config.compile and learner.differentiates_backbone_twice:
        raise ConfigError(
            f"--compile: method {config.method!r} differentiates twice through the backbone (second-order MAML), "
            "which torch.compile cannot; drop --compile, or use fomaml or anil",
            "compile",
        )
    if config.backbone_lr == 0:
        backbone = {id(p) for p in learner.backbone.parameters()}
        if all(id(p) in backbone for p in learner.parameters()):
            raise ConfigError(
                f"method {config.method!r} has no parameters besides the backbone; --backbone-lr 0 would train nothing",
                "backbone_lr",
            )
    return learner


def check_external_backbone(config: TrainConfig, learner: Any) -> None:
    """An external backbone embeds a batch of the run's images (e.g. a ViT built for 224-pixel
    inputs refuses 64-pixel ones), and the method trains on one small episode of them (e.g.
    second-order MAML needs second derivatives, which some activations lack), before any data
    is read. Built-in backbones are known to pass."""
    import torch

    from medmeta.backbones.external import ExternalBackbone, first_line

    backbone = learner.backbone
    if not isinstance(backbone, ExternalBackbone):
        return
    generator = torch.Generator().manual_seed(0)
    if (config.spatial_dims or 2) == 3:
        raise ConfigError(f"backbone {backbone.name} is a 2D model; volumes (spatial_dims 3) need conv4 or resnet12", "backbone")
    side = config.image_size or DEFAULT_IMAGE_SIZE[2]
    images = torch.rand(4, config.channels or DEFAULT_CHANNELS[2], side, side, generator=generator)
    size = f"{side}x{side}"
    try:
        with torch.no_grad():
            out = backbone.eval()(images[:2])
    except Exception as exc:
        hint = ""
        if any(word in str(exc).lower() for word in ("height", "width", "size")):  # built for one size, e.g. a ViT
            timm = backbone.library == "timm"
            hint = " (timm ViTs take --backbone-option dynamic_img_size=true)" if timm else " (try --image-size 224)"
        raise ConfigError(f"backbone {backbone.name} cannot embed {size} images: {first_line(exc)}{hint}", "image_size") from None
    if tuple(out.shape) != (2, backbone.num_features):
        shape = tuple(out.shape)[1:]
        raise ConfigError(f"backbone {backbone.name} gives embeddings of shape {shape}, not ({backbone.num_features},)", "backbone")
    labels = torch.tensor([0, 1])
    try:
        with torch.random.fork_rng(devices=[]):
            loss, _ = learner.train().episode_loss(images[:2], labels, images[2:], labels)
            loss.backward()
    except Exception as exc:
        hint = " (second-order MAML; --method fomaml or anil need no second derivatives)" if "derivative for" in str(exc) else ""
        message = f"method {config.method} cannot train on {backbone.name} at {size}: {first_line(exc)}{hint}"
        raise ConfigError(message, "method") from None
    learner.zero_grad(set_to_none=True)


def check_backbone_weights(config: TrainConfig, learner: Any, resume: bool = False) -> None:
    """``backbone_weights``: not with ``init_from``; ``pretrained`` only for a library model that
    has pretrained weights (nothing is downloaded here); a file is read and loaded into the
    throwaway ``learner`` (so missing, unreadable and mismatching files are refused before any
    work), except on ``resume``."""
    import os

    from medmeta.backbones.external import ExternalBackbone
    from medmeta.backbones.weights import PRETRAINED, load_backbone_weights

    if config.backbone_weights is None:
        return
    if config.init_from:
        raise ConfigError("give --init-from or --backbone-weights, not both: both set the backbone's starting weights", "backbone_weights")
    source = os.fspath(config.backbone_weights)
    if source == PRETRAINED:
        backbone = learner.backbone
        if not isinstance(backbone, ExternalBackbone):
            raise ConfigError(
                f"'{PRETRAINED}' is the download of a torchvision:MODEL or timm:MODEL backbone; {config.backbone} has none "
                "(give a weights file instead)",
                "backbone_weights",
            )
        if not backbone.has_pretrained():
            raise ConfigError(f"{backbone.name}: {backbone.library} publishes no pretrained weights for this model", "backbone_weights")
        return
    if resume:
        return
    try:
        load_backbone_weights(learner.backbone, source)
    except ValueError as exc:  # WeightsError, BackboneError
        raise ConfigError(str(exc), "backbone_weights") from None


def check_config(config: TrainConfig, resume: bool = False) -> None:
    """All of the above, cheapest first (the weights file is read unless ``resume``)."""
    check_types(config)
    check_values(config)
    check_calibration_settings(config)
    check_names(config)
    learner = check_learner(config)
    check_external_backbone(config, learner)
    check_backbone_weights(config, learner, resume=resume)
