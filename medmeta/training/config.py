"""Everything that defines a training run (stored in checkpoints and resume state)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class TrainConfig:
    """Hyperparameters of ``medmeta train``; ``None`` episode settings come from the protocol.

    The schedule: decode and cache the train/val images, pre-train the backbone as an ordinary
    classifier over all meta-train classes (``pretrain_epochs``), then meta-train episodically
    (``episodes``), validating on val-class episodes every ``val_interval`` episodes and keeping
    the best; finally calibrate on separate val-class episodes: a temperature, then split
    conformal prediction sets (``conformal_score`` ``"lac"`` or ``"aps"``, target ``coverage``,
    optionally ``class_conditional``) and the distance threshold above which ``refer_share`` of
    in-distribution cases would be referred (see ``docs/calibration.md``). ``init_from`` starts the
    backbone from another checkpoint's backbone (same architecture), e.g. one pre-trained
    backbone shared by several methods. In episodic training the backbone learns at
    ``backbone_lr`` (``None``: ``lr``; ``0``: frozen, with its normalisation statistics fixed, as
    when the method's own modules are trained on a pre-trained backbone), and ``grad_clip`` caps
    the gradient norm of each optimiser step (``None``: no clipping). ``train_shots`` draws the
    shot of every meta-training episode from these values (uniformly, seeded by the episode
    index), so one model meets the support sizes it will be used with; validation and
    calibration keep ``shot``.
    """

    protocol: str = "sample_data/protocol.yaml"
    out: str = "runs/medmeta"
    method: str = "protonet"
    backbone: str = "conv4"
    way: int | None = None
    shot: int | None = None
    train_shots: list[int] | None = None
    query: int | None = None
    episodes: int = 150
    image_size: int = 64
    channels: int = 3
    meta_batch: int = 1
    lr: float = 1e-3
    backbone_lr: float | None = None
    grad_clip: float | None = None
    weight_decay: float = 0.0
    lr_step: int = 2000
    lr_gamma: float = 0.5
    pretrain_epochs: int = 10
    pretrain_lr: float = 0.05
    pretrain_batch_size: int = 64
    augment: str = "light"
    val_interval: int = 50
    val_episodes: int = 100
    calibration_episodes: int = 200
    conformal_score: str = "lac"
    coverage: float = 0.9
    class_conditional: bool = False
    refer_share: float = 0.05
    seed: int = 0
    device: str = "auto"
    max_minutes: float | None = None
    init_from: str | None = None
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
