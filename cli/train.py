"""``medmeta train``: meta-train a few-shot learner on a protocol's common conditions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medmeta.cli.common import user_errors
from medmeta.backbones import list_backbones
from medmeta.methods import list_methods
from medmeta.training import TrainConfig
from medmeta.training import train as run_training

_DEFAULTS = TrainConfig()


def train(
    protocol: Annotated[Path, typer.Option(help="Protocol YAML (class splits, episode shape).")] = Path(_DEFAULTS.protocol),
    method: Annotated[str, typer.Option(help=f"Meta-learner: {', '.join(list_methods())}.")] = _DEFAULTS.method,
    backbone: Annotated[str, typer.Option(help=f"Backbone: {', '.join(list_backbones())}.")] = _DEFAULTS.backbone,
    way: Annotated[Optional[int], typer.Option(help="Classes per episode [default: protocol's].")] = None,
    shot: Annotated[Optional[int], typer.Option(help="Support scans per class [default: protocol's largest].")] = None,
    train_shot: Annotated[Optional[list[int]], typer.Option(help="Draw each training episode's shot from these values (repeatable, e.g. --train-shot 1 --train-shot 5); validation keeps --shot.")] = None,
    query: Annotated[Optional[int], typer.Option(help="Query scans per class [default: protocol's].")] = None,
    episodes: Annotated[int, typer.Option(help="Episodic training episodes (total, also on --resume).")] = _DEFAULTS.episodes,
    pretrain_epochs: Annotated[int, typer.Option(help="Epochs of backbone pre-training on all meta-train classes (0 = none).")] = _DEFAULTS.pretrain_epochs,
    image_size: Annotated[int, typer.Option(help="Square input size in pixels.")] = _DEFAULTS.image_size,
    channels: Annotated[int, typer.Option(help="Input channels: 3 (RGB) or 1 (grayscale).")] = _DEFAULTS.channels,
    meta_batch: Annotated[int, typer.Option(help="Episodes (tasks) averaged per optimiser step.")] = _DEFAULTS.meta_batch,
    lr: Annotated[float, typer.Option(help="Adam learning rate of episodic training.")] = _DEFAULTS.lr,
    backbone_lr: Annotated[Optional[float], typer.Option(help="Learning rate of the backbone in episodic training [default: --lr]; 0 freezes it.")] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help="Clip the gradient norm of each episodic step to this value.")] = None,
    method_option: Annotated[Optional[list[str]], typer.Option(help="Method hyperparameter KEY=VALUE (repeatable), e.g. inner_steps=5.")] = None,
    backbone_option: Annotated[Optional[list[str]], typer.Option(help="Backbone argument KEY=VALUE (repeatable), e.g. norm_kind=group.")] = None,
    augment: Annotated[str, typer.Option(help="Augmentation: none, light, strong.")] = _DEFAULTS.augment,
    val_interval: Annotated[int, typer.Option(help="Validate on val classes every N episodes.")] = _DEFAULTS.val_interval,
    val_episodes: Annotated[int, typer.Option(help="Episodes per validation.")] = _DEFAULTS.val_episodes,
    calibration_episodes: Annotated[int, typer.Option(help="Val-class episodes to fit the temperature on.")] = _DEFAULTS.calibration_episodes,
    conformal_score: Annotated[str, typer.Option(help="Conformal score of the prediction sets: lac (1 - p_true) or aps (cumulative sorted mass).")] = _DEFAULTS.conformal_score,
    coverage: Annotated[float, typer.Option(help="Target coverage of the prediction sets, e.g. 0.9.")] = _DEFAULTS.coverage,
    class_conditional: Annotated[bool, typer.Option("--class-conditional", help="Mondrian conformal over the val classes; apply the largest per-class threshold.")] = _DEFAULTS.class_conditional,
    refer_share: Annotated[float, typer.Option(help="Share of in-distribution (val) cases the distance threshold refers, e.g. 0.05.")] = _DEFAULTS.refer_share,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop episodic training after this many training minutes.")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Start the backbone from this checkpoint's backbone (same architecture).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = _DEFAULTS.device,
    seed: Annotated[int, typer.Option(help="Seed of episodes, augmentation and initialisation.")] = _DEFAULTS.seed,
    out: Annotated[Path, typer.Option(help="Run folder: best.safetensors/best.json, last.* for --resume.")] = Path(_DEFAULTS.out),
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last saved state.")] = False,
) -> None:
    """Meta-train: pre-train the backbone, train on episodes, keep the best model on val classes, calibrate.

    With no options it trains on the synthetic demo set in sample_data/ (about a minute on 2 CPU cores).
    """
    config = TrainConfig(
        protocol=str(protocol), out=str(out), method=method, backbone=backbone, way=way, shot=shot, query=query,
        train_shots=list(train_shot) if train_shot else None,
        episodes=episodes, pretrain_epochs=pretrain_epochs, image_size=image_size, channels=channels, lr=lr,
        backbone_lr=backbone_lr, grad_clip=grad_clip,
        meta_batch=meta_batch, init_from=str(init_from) if init_from else None,
        augment=augment, val_interval=val_interval, val_episodes=val_episodes,
        calibration_episodes=calibration_episodes, max_minutes=max_minutes, device=device, seed=seed,
        conformal_score=conformal_score, coverage=coverage, class_conditional=class_conditional, refer_share=refer_share,
    )
    with user_errors():
        config.method_kwargs = parse_key_values(method_option or [], "--method-option")
        config.backbone_kwargs = parse_key_values(backbone_option or [], "--backbone-option")
        _validate_choices(config)
        run_training(config, resume=resume)


def parse_key_values(items: list[str], option: str) -> dict:
    """``["inner_steps=5", "first_order=true"]`` -> ``{"inner_steps": 5, "first_order": True}`` (YAML scalars)."""
    import yaml

    from medmeta.errors import MedmetaError

    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MedmetaError(f"{option} expects KEY=VALUE, got {item!r}")
        try:
            parsed[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise MedmetaError(f"{option} {item!r}: cannot parse the value") from None
    return parsed


def _validate_choices(config: TrainConfig) -> None:
    from medmeta.data.augment import AUGMENTATIONS
    from medmeta.errors import MedmetaError
    from medmeta.training.trainer import check_calibration_settings

    if config.method not in list_methods():
        raise MedmetaError(f"unknown --method {config.method!r}; choose from {', '.join(list_methods())}")
    if config.backbone not in list_backbones():
        raise MedmetaError(f"unknown --backbone {config.backbone!r}; choose from {', '.join(list_backbones())}")
    if config.augment not in AUGMENTATIONS:
        raise MedmetaError(f"unknown --augment {config.augment!r}; choose from {', '.join(AUGMENTATIONS)}")
    if config.channels not in (1, 3):
        raise MedmetaError("--channels must be 1 or 3")
    if config.image_size < 16:
        raise MedmetaError("--image-size must be at least 16")
    if config.backbone_lr is not None and config.backbone_lr < 0:
        raise MedmetaError("--backbone-lr must be 0 (frozen) or positive")
    if config.grad_clip is not None and config.grad_clip <= 0:
        raise MedmetaError("--grad-clip must be positive")
    check_calibration_settings(config)
