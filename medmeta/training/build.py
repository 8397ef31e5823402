"""Building the learner a run trains: method and backbone from the config, and starting the
backbone of a fresh run from another checkpoint (``init_from``) or from weights the user brings
(``backbone_weights``: a file, or ``pretrained`` for a torchvision/timm backbone)."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from medmeta.errors import CheckpointError, MedmetaError
from medmeta.training.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from medmeta.data.protocol import Protocol
    from medmeta.methods import MetaLearner


def backbone_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The method's backbone defaults, overridden by the user's ``backbone_kwargs``.

    External backbones (``torchvision:``/``timm:``) take no method defaults: they keep the
    normalisation layers their weights were trained with (e.g. MAML's ``norm_kind="group"`` is
    not applied; MAML then runs with the model's BatchNorm, see ``docs/backbones.md``)."""
    from medmeta.backbones.registry import is_external
    from medmeta.methods.registry import METHODS

    from medmeta.training.checks import DEFAULT_CHANNELS, VOLUME_BACKBONE_DEFAULTS

    dims = config.spatial_dims or 2
    defaults = {} if is_external(config.backbone) else dict(getattr(METHODS.get(config.method), "backbone_defaults", {}))
    # 2D checkpoints keep the record they had
    volume = {"spatial_dims": 3, **VOLUME_BACKBONE_DEFAULTS.get(config.backbone, {})} if dims == 3 else {}
    return {"in_channels": config.channels or DEFAULT_CHANNELS[dims], **volume, **defaults, **config.backbone_kwargs}


def resolve_for_protocol(config: TrainConfig, protocol: "Protocol") -> TrainConfig:
    """A copy of ``config`` with the settings the protocol decides filled in: ``spatial_dims``
    (the protocol's; a config that names the other is refused), then ``image_size`` and
    ``channels`` from the protocol's ``preprocessing``, else the defaults for its dimensions; the
    schedule fields left unset take :data:`~medmeta.training.checks.DEFAULT_SCHEDULE`'s."""
    import dataclasses

    from medmeta.backbones.registry import is_external
    from medmeta.training.checks import DEFAULT_CHANNELS, DEFAULT_IMAGE_SIZE, DEFAULT_SCHEDULE

    dims = protocol.spatial_dims
    if config.spatial_dims is not None and config.spatial_dims != dims:
        raise ConfigError(
            f"spatial_dims {config.spatial_dims} does not match the protocol {protocol.name}, whose scans are "
            f"{'volumes (3)' if dims == 3 else 'images (2)'}", "spatial_dims",
        )
    if dims == 3 and is_external(config.backbone):
        raise ConfigError(f"backbone {config.backbone} is a 2D model; volumes need conv4 or resnet12", "backbone")
    stored = protocol.preprocessing
    schedule = {name: default for name, default in DEFAULT_SCHEDULE[dims].items() if getattr(config, name) is None}
    return dataclasses.replace(
        config,
        **schedule,
        spatial_dims=dims,
        image_size=config.image_size or stored.get("image_size") or DEFAULT_IMAGE_SIZE[dims],
        channels=config.channels or stored.get("channels") or DEFAULT_CHANNELS[dims],
    )


def run_preprocessing(config: TrainConfig, protocol: "Protocol"):
    """The :class:`~medmeta.data.reading.Preprocessing` of a run (``config`` resolved by
    :func:`resolve_for_protocol`): its size and channels, the rest from the protocol."""
    from medmeta.data.reading import Preprocessing

    stored = {k: v for k, v in protocol.preprocessing.items() if k not in ("image_size", "channels")}
    return Preprocessing.from_dict(
        {"image_size": config.image_size, "channels": config.channels, "spatial_dims": config.spatial_dims, **stored}
    )


def build_learner(config: TrainConfig) -> "MetaLearner":
    """A freshly initialised learner (draws from torch's global random state)."""
    from medmeta.backbones import create_backbone
    from medmeta.methods import create_method

    try:
        backbone = create_backbone(config.backbone, **backbone_kwargs(config))
        return create_method(config.method, backbone, **config.method_kwargs)
    except MedmetaError:  # e.g. an external backbone's own one-line refusal
        raise
    except (TypeError, ValueError) as exc:
        raise MedmetaError(f"cannot build {config.method} on {config.backbone}: {exc}") from None


def init_backbone(learner: "MetaLearner", config: TrainConfig, quiet: bool = False) -> None:
    """Start the backbone of a fresh run: from the checkpoint ``config.init_from``, or from
    ``config.backbone_weights``; nothing when neither is set. Not for a resumed run, whose
    saved state holds the weights."""
    if config.init_from:
        copy_checkpoint_backbone(learner, config)
    if config.backbone_weights is not None:
        load_weights(learner, config, quiet=quiet)


def load_weights(learner: "MetaLearner", config: TrainConfig, quiet: bool = False) -> None:
    """Load ``config.backbone_weights`` into the learner's backbone (a file, or ``pretrained``:
    the library's download); prints which classifier entries of the file were ignored."""
    import os

    from medmeta.backbones.weights import load_backbone_weights
    from medmeta.progress import console

    report = load_backbone_weights(learner.backbone, os.fspath(config.backbone_weights))
    if not quiet:
        console.print(f"Backbone {config.backbone} starts from {report.source} ({report.loaded} tensors)", highlight=False)
        for note in report.notes():
            console.print(note, highlight=False)


def copy_checkpoint_backbone(learner: "MetaLearner", config: TrainConfig) -> None:
    """Copy the backbone weights of the checkpoint ``config.init_from`` into ``learner``."""
    from medmeta.checkpoint import load_checkpoint

    ckpt = load_checkpoint(config.init_from)
    theirs = ckpt.meta.get("backbone", {})
    ours = {"name": config.backbone, "kwargs": backbone_kwargs(config)}
    if theirs.get("name") != ours["name"] or _with_defaults(ours["name"], theirs.get("kwargs", {})) != _with_defaults(
        ours["name"], ours["kwargs"]
    ):
        raise CheckpointError(
            f"{ckpt.path}: its backbone {theirs.get('name')} {theirs.get('kwargs')} differs from this run's "
            f"{ours['name']} {ours['kwargs']}"
        )
    weights = {k[len("backbone.") :]: v for k, v in ckpt.tensors.items() if k.startswith("backbone.")}
    learner.backbone.load_state_dict(weights, strict=True)


def _with_defaults(backbone: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Backbone arguments with the constructor's defaults filled in (``{}`` == ``{"hidden": 64}``)."""
    from medmeta.backbones.registry import BACKBONES

    params = inspect.signature(BACKBONES.get(backbone)).parameters
    full = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    full.update(kwargs)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}


def episode_shape(config: TrainConfig, protocol: "Protocol") -> tuple[int, int, int]:
    """``(way, shot, query)``: the config's, or else the protocol's (its largest shot)."""
    way = config.way or protocol.episodes.way
    shot = config.shot or max(protocol.episodes.shot)
    query = config.query or protocol.episodes.query
    return way, shot, query
