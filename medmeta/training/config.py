"""Everything that defines a training run (stored in checkpoints, resume state and ``config.yaml``).

Each field carries its help text (``metadata["help"]``): the ``train`` command builds its
options from them, so the command line, the YAML file given to ``--config`` and the Python API
share one list of settings. This module imports neither torch nor MONAI.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medmeta.errors import MedmetaError


class ConfigError(MedmetaError, ValueError):
    """A training setting is invalid; ``field`` names the :class:`TrainConfig` field."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)


def _setting(default: Any = None, help: str = "", option: str | None = None, factory: Any = None) -> Any:
    """A dataclass field with its help text and (when it differs from the field's name) the
    name of its command-line option."""
    metadata = {"help": help, **({"option": option} if option else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


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
    backbone shared by several methods; ``backbone_weights`` starts it from a weights file (or,
    for a ``torchvision:``/``timm:`` backbone, ``"pretrained"``: the library's download), see
    ``docs/backbones.md``. Both apply to a fresh run only: a resumed run has its weights. In
    episodic training the backbone learns at ``backbone_lr`` (``None``: ``lr``; ``0``: frozen,
    with its normalisation statistics fixed, as when the method's own modules are trained on a
    pre-trained backbone), and ``grad_clip`` caps
    the gradient norm of each optimiser step (``None``: no clipping). ``train_shots`` draws the
    shot of every meta-training episode from these values (uniformly, seeded by the episode
    index), so one model meets the support sizes it will be used with; validation and
    calibration keep ``shot``.

    :meth:`validate` refuses every bad value with a :class:`ConfigError` (a :class:`MedmetaError`);
    :func:`medmeta.training.train` calls it before any work.
    """

    protocol: str = _setting("sample_data/protocol.yaml", "Protocol YAML (class splits, episode shape).")
    out: str = _setting("runs/medmeta", "Run folder: best.safetensors/best.json, last.* for --resume, config.yaml.")
    method: str = _setting("protonet", "Meta-learner: {methods}.")
    backbone: str = _setting(
        "conv4",
        "Backbone: {backbones}; or a model of another library, torchvision:MODEL or timm:MODEL "
        "(extras medmeta[torchvision] / medmeta[timm]; see docs/backbones.md).",
    )
    way: int | None = _setting(None, "Classes per episode [default: protocol's].")
    shot: int | None = _setting(None, "Support scans per class [default: protocol's largest].")
    train_shots: list[int] | None = _setting(
        None,
        "Draw each training episode's shot from these values (repeatable, e.g. --train-shot 1 --train-shot 5); "
        "validation keeps --shot.",
        option="train-shot",
    )
    query: int | None = _setting(None, "Query scans per class [default: protocol's].")
    episodes: int | None = _setting(
        None, "Episodic training episodes (total, also on --resume) [default: 3200 for images, 600 for volumes]."
    )
    image_size: int | None = _setting(
        None,
        "Side of the square input in pixels, of the cube in voxels for volumes (at least 16) "
        "[default: the protocol's preprocessing.image_size, else 64 for images, 28 for volumes].",
    )
    channels: int | None = _setting(
        None, "Input channels: 3 (RGB) or 1 (grayscale) [default: the protocol's, else 3 for images, 1 for volumes]."
    )
    spatial_dims: int | None = _setting(
        None, "2 for images, 3 for volumes [default: the protocol's episodes.spatial_dims, which it must match]."
    )
    meta_batch: int = _setting(1, "Episodes (tasks) averaged per optimiser step.")
    lr: float = _setting(1e-3, "Adam learning rate of episodic training.")
    backbone_lr: float | None = _setting(None, "Learning rate of the backbone in episodic training [default: --lr]; 0 freezes it.")
    grad_clip: float | None = _setting(None, "Clip the gradient norm of each episodic step to this value [default: no clipping].")
    weight_decay: float = _setting(0.0, "Adam weight decay of episodic training.")
    lr_step: int = _setting(2000, "Multiply the episodic learning rate by --lr-gamma every N episodes.")
    lr_gamma: float = _setting(0.5, "Factor of the episodic learning-rate step.")
    ema_decay: float = _setting(
        0.997,
        "Keep an exponential moving average of the weights in episodic training (decay per optimiser step, e.g. 0.997; "
        "0 = none); every validation also scores the average, and the better model is kept.",
    )
    pretrain_epochs: int | None = _setting(
        None, "Epochs of backbone pre-training on all meta-train classes (0 = none) [default: 20 for images, 5 for volumes]."
    )
    pretrain_lr: float = _setting(0.05, "SGD learning rate of pre-training (cosine-annealed).")
    pretrain_batch_size: int = _setting(64, "Images per pre-training batch.")
    pretrain_label_smoothing: float = _setting(0.0, "Label smoothing of the pre-training cross-entropy (0 = none; e.g. 0.1).")
    pretrain_contrastive: float = _setting(
        0.0, "Weight of the self-supervised contrastive loss (two augmented views per image, NT-Xent) added in pre-training (0 = none; e.g. 0.5)."
    )
    pretrain_generations: int = _setting(
        1, "Born-again self-distillation: each pre-training generation after the first starts afresh and learns from the labels and the previous one's softened predictions (1 = none)."
    )
    augment: str = _setting("light", "Augmentation: {augments}.")
    augment_grayscale: float = _setting(
        0.0, "Probability that a training image's colour is replaced by its luminance (colour-invariant features, e.g. for a grayscale modality)."
    )
    val_interval: int = _setting(200, "Validate on val classes every N episodes.")
    val_episodes: int | None = _setting(
        None, "Episodes per validation (also the held-out episodes of the calibration report) [default: 300 for images, 60 for volumes]."
    )
    calibration_episodes: int | None = _setting(
        None, "Val-class episodes to fit the temperature, conformal and referral thresholds on [default: 100 for images, 50 for volumes]."
    )
    tuning_episodes: int | None = _setting(
        None, "Val-class episodes on which the finetune head's steps and learning rate are chosen (0: its defaults) [default: 50, or the validation episodes if fewer; 20 for volumes]."
    )
    conformal_score: str = _setting("lac", "Conformal score of the prediction sets: lac (1 - p_true) or aps (cumulative sorted mass).")
    coverage: float = _setting(0.9, "Target coverage of the prediction sets, e.g. 0.9.")
    class_conditional: bool = _setting(False, "Mondrian conformal over the val classes; apply the largest per-class threshold.")
    refer_share: float = _setting(0.05, "Share of in-distribution (val) cases the distance threshold refers, e.g. 0.05.")
    seed: int = _setting(0, "Seed of episodes, augmentation and initialisation.")
    device: str = _setting("auto", "auto, cpu or cuda.")
    precision: str = _setting(
        "auto",
        "Arithmetic of the training steps: fp32, bf16 (autocast), fp16 (autocast with loss scaling; GPU only) or auto "
        "(the best measured at equal accuracy: fp32 for now, see docs/training.md). Validation, calibration and adapt stay fp32.",
    )
    workers: int | None = _setting(
        None,
        "Data-loader worker processes that decode the scans before training and augment the next batches while a "
        "step trains (0: all in the training process) [default: decoding on every core (at most 8); batches on the "
        "cores the training processes leave (at most 4), none on 2 cores].",
    )
    cache_dir: str | None = _setting(
        None,
        "Keep the decoded, resized scans in this folder (MONAI PersistentDataset, keyed by file content and "
        "preprocessing) so that later runs on the same scans skip decoding [default: none].",
    )
    cache_in_memory: bool = _setting(
        True,
        "Hold the decoded scans in memory; --no-cache-in-memory (with --cache-dir) reads them from the cache "
        "folder at every use, for a data set larger than memory.",
    )
    compile: bool = _setting(False, "Compile the backbone with torch.compile (slow first steps; not for second-order MAML).")
    max_minutes: float | None = _setting(None, "Stop episodic training after this many training minutes.")
    init_from: str | None = _setting(None, "Start the backbone from this checkpoint's backbone (same architecture).")
    backbone_weights: str | None = _setting(
        None,
        "Start the backbone from these weights: a safetensors file or a PyTorch state dict (read with "
        "torch.load(weights_only=True)); or 'pretrained': the library's own download, for torchvision:/timm: backbones.",
    )
    method_kwargs: dict[str, Any] = _setting(
        help="Method hyperparameter KEY=VALUE (repeatable), e.g. inner_steps=5.", option="method-option", factory=dict
    )
    backbone_kwargs: dict[str, Any] = _setting(
        help="Backbone argument KEY=VALUE (repeatable), e.g. norm_kind=group [volumes: conv4 defaults to hidden=32].", option="backbone-option", factory=dict
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Lenient: keys this version does not know (from older or newer runs) are dropped."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def validate(self, resume: bool = False) -> "TrainConfig":
        """Refuse every invalid setting with a :class:`ConfigError` naming the field (calibration
        settings with a :class:`~medmeta.errors.CalibrationError`); returns ``self``. Builds the
        learner once (random state untouched) to check the method's options, and loads
        ``backbone_weights`` into it to check the file, except for a run to ``resume`` (whose
        saved state holds the weights; the file may be gone)."""
        from medmeta.training.checks import check_config

        check_config(self, resume=resume)
        return self

    # ---- YAML files (``--config``) -----------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """A config from a YAML mapping of field names (unknown keys and wrong types refused,
        naming the file and the key); missing fields keep their defaults."""
        from medmeta.training.config_file import read_config_file

        return cls(**read_config_file(path))

    def to_yaml(self) -> str:
        from medmeta.training.config_file import config_yaml

        return config_yaml(self)


def option_name(name: str) -> str:
    """The command-line option of field ``name``, e.g. ``--train-shot`` for ``train_shots``."""
    spec = next(f for f in fields(TrainConfig) if f.name == name)
    return "--" + spec.metadata.get("option", name.replace("_", "-"))


def help_text(name: str) -> str:
    """The help of field ``name``, with the method/backbone/augmentation names filled in."""
    from medmeta.training.names import AUGMENT_NAMES, BACKBONE_NAMES, METHOD_NAMES

    spec = next(f for f in fields(TrainConfig) if f.name == name)
    return spec.metadata["help"].format(
        methods=", ".join(METHOD_NAMES), backbones=", ".join(BACKBONE_NAMES), augments=", ".join(AUGMENT_NAMES)
    )
