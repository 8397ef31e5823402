"""Building the learner a run trains: method and backbone from the config, and starting the
backbone of a fresh run from another checkpoint (``init_from``) or from weights the user brings
(``backbone_weights``: a file, or ``pretrained`` for a torchvision/timm backbone)."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from medmeta.errors import CheckpointError, MedmetaError
from medmeta.training.config import TrainConfig

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

    defaults = {} if is_external(config.backbone) else dict(getattr(METHODS.get(config.method), "backbone_defaults", {}))
    return {"in_channels": config.channels, **defaults, **config.backbone_kwargs}


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
