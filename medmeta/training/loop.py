"""The training run: :func:`train` orchestrates the phases on a :class:`Run`.

decode images -> pre-train (:mod:`.pretrain`) -> meta-train (:mod:`.episodic`), validating and
keeping the best (:mod:`.selection`), saving resume state (:mod:`.resume`) -> calibrate the
best model (:mod:`.calibration`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmeta.errors import MedmetaError
from medmeta.progress import console, make_progress
from medmeta.training.config import ConfigError, TrainConfig


@dataclass
class TrainResult:
    """Where the checkpoint is and how training went; ``calibration`` is the
    :class:`~medmeta.calibration.CalibrationRecord` stored in it."""

    out: Path
    checkpoint: Path
    best_val: dict[str, float]
    calibration: Any
    episodes_done: int
    episodes_per_second: float
    history: list[dict[str, Any]] = field(default_factory=list)


class Run:
    """State of one training run: config, protocol, data, learner, optimiser and counters."""

    def __init__(self, config: TrainConfig, quiet: bool = False, processes: Any = None):
        from medmeta.data.augment import Augmenter
        from medmeta.data.loading import auto_decode_workers, auto_workers
        from medmeta.data.protocol import load_protocol
        from medmeta.data.reading import ScanReader
        from medmeta.data.store import ImageStore
        from medmeta.device import resolve_device, training_memory_format
        from medmeta.precision import float32_features, grad_scaler, resolve_precision
        from medmeta.training.build import build_learner, episode_shape, resolve_for_protocol, run_preprocessing

        from medmeta.training.distributed import Processes, check_distributed, start

        self.processes = processes or Processes()
        self.quiet, self.out = quiet or not self.processes.is_main, Path(config.out)
        self.device = self.processes.device(resolve_device(config.device))
        self.protocol = load_protocol(config.protocol)
        self.config = config = resolve_for_protocol(config, self.protocol)
        self.way, self.shot, self.query = episode_shape(config, self.protocol)
        self.train_shots = sorted({int(s) for s in config.train_shots}) if config.train_shots else [self.shot]
        if min(self.train_shots) < 1:
            raise ConfigError(f"train_shots must be positive, got {config.train_shots}", "train_shots")
        self.protocol.check_counts(max(self.shot, *self.train_shots), self.query, splits=("train",))
        check_distributed(self.processes, config.meta_batch, config.episodes, config.pretrain_batch_size if config.pretrain_epochs else None)
        start(self.processes, self.device)
        self.val_way = min(self.way, len(self.protocol.classes["val"]))
        self.preprocessing = run_preprocessing(config, self.protocol)
        self.store = ImageStore(ScanReader(self.preprocessing), cache_dir=config.cache_dir, in_memory=config.cache_in_memory)
        self.workers = auto_workers(self.processes.world_size) if config.workers is None else config.workers
        self.decode_workers = auto_decode_workers(self.processes.world_size) if config.workers is None else config.workers
        self.learner = build_learner(config)
        # batches are (n, C, H, W), or (n, C, D, H, W) for volumes
        self.memory_format = training_memory_format(self.device, image_ndim=2 + config.spatial_dims)
        self.learner.to(self.device, memory_format=self.memory_format)
        try:
            self.precision = resolve_precision(config.precision, self.device)
        except MedmetaError as exc:
            raise ConfigError(str(exc), "precision") from None
        self.scaler = grad_scaler(self.device, self.precision)  # loss scaling for fp16; passes through otherwise
        float32_features(self.learner.backbone, self.precision)  # the methods' heads compute in float32
        if config.compile:
            self.learner.backbone.compile()  # in place: parameter names (and checkpoints) stay as they are
        self.augment = Augmenter(config.augment, seed=config.seed, grayscale=config.augment_grayscale, spatial_dims=config.spatial_dims)
        self.history: list[dict[str, Any]] = []
        self.best_val: dict[str, Any] = {"accuracy": -1.0}
        self.best_outputs: Any = None  # val episodes of the best model, when validated in this session
        self.heads: dict[str, Any] = {}  # the sidecar's heads entry, once calibrated
        self.phase, self.epoch, self.episode = "pretrain", 0, 0
        self.train_seconds, self.episodes_per_second = 0.0, 0.0
        self.head: torch.nn.Linear | None = None
        self.projection: torch.nn.Module | None = None  # the contrastive loss's, in pre-training
        self.generation = 0  # of self-distillation in pre-training
        self.teacher: torch.nn.Module | None = None  # the previous generation, frozen
        self.optimizer: torch.optim.Optimizer | None = None
        self.step_module: torch.nn.Module | None = None  # the phase's forward pass, in DDP with several processes
        self.ema: torch.optim.swa_utils.AveragedModel | None = None  # the weights' moving average, in episodic training
        self.scheduler: Any = None
        self.progress: Any = None  # the live progress bar, while one runs

    def load_images(self) -> None:
        """Decode and cache train and val images once; unreadable files are reported and dropped.
        Then the episode samplers: training (one per training shot), validation, calibration."""
        from medmeta.data.episodes import EpisodeSampler
        from medmeta.training.calibration import CALIBRATION_SEED_OFFSET, VAL_SEED_OFFSET

        records = [r for s in ("train", "val") for c in self.protocol.classes[s] for r in self.protocol.records[c]]
        with make_progress(transient=True, disable=self.quiet) as progress:
            task = progress.add_task("Decoding scans", total=len(records), status="")
            _, bad = self.store.warm(records, on_progress=lambda: progress.advance(task), workers=self.decode_workers)
        if bad:
            self._drop_unreadable(bad)
        train, val, seed = self.protocol.split_records("train"), self.protocol.split_records("val"), self.config.seed
        self.train_samplers = {shot: EpisodeSampler(train, self.way, shot, self.query, seed) for shot in self.train_shots}
        self.val_sampler = EpisodeSampler(val, self.val_way, self.shot, self.query, seed + VAL_SEED_OFFSET)
        self.calibration_sampler = EpisodeSampler(val, self.val_way, self.shot, self.query, seed + CALIBRATION_SEED_OFFSET)

    def _drop_unreadable(self, bad: list) -> None:
        console.print(f"[yellow]{len(bad)} unreadable file(s) skipped[/], e.g. {bad[0][0].key}: {bad[0][1]}")
        bad_keys = {r.key for r, _ in bad}
        for name in list(self.protocol.records):
            self.protocol.records[name] = [r for r in self.protocol.records[name] if r.key not in bad_keys]
        self.protocol.check_counts(max(self.shot, *self.train_shots), self.query, splits=("train",))

    def episode_loader(self):
        """Training episodes ``episode .. episodes - 1`` (this process's share of each
        meta-batch) as :class:`~medmeta.data.loading.EpisodeBatch` items, built by
        :attr:`workers` processes ahead of the step (:mod:`medmeta.data.loading`)."""
        from medmeta.data.loading import EpisodeImages, MetaBatchIndices, make_loader

        cfg = self.config
        indices = MetaBatchIndices(self.episode, cfg.episodes, cfg.meta_batch, self.processes)
        return make_loader(EpisodeImages(self.train_episode, self.store, self.augment), indices, self.workers, cfg.seed)

    def autocast(self):
        """The mixed-precision context of a training step's forward pass (:mod:`medmeta.precision`)."""
        from medmeta.precision import autocast

        return autocast(self.device, self.precision)

    def optimiser_step(self, loss: torch.Tensor | None = None, clip: float | None = None) -> None:
        """Backpropagate ``loss`` (unless already done: ``None``), clip the gradient norm to
        ``clip`` and step the optimiser, all through the loss scaler (fp16: a step whose
        gradients overflowed is skipped and the scale lowered)."""
        assert self.optimizer is not None
        if loss is not None:
            self.scaler.scale(loss).backward()
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for group in self.optimizer.param_groups for p in group["params"]], clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def batch_to_device(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of images on the training device, in the model's memory layout."""
        return images.to(self.device, memory_format=self.memory_format)

    @contextmanager
    def checkpoint_layout(self):
        """The model in the default memory layout while inside, as ``adapt``, ``evaluate`` and
        ``calibrate`` load a checkpoint, so that validation scores exactly what they will; back
        to the training layout afterwards."""
        self.learner.to(memory_format=torch.contiguous_format)
        try:
            yield
        finally:
            self.learner.to(memory_format=self.memory_format)

    @contextmanager
    def averaged_weights(self):
        """The learner holds the moving average of its weights (:attr:`ema`) while inside, its
        own weights again afterwards (copied in place: the optimiser's references stay valid)."""
        assert self.ema is not None
        own = {name: value.clone() for name, value in self.learner.state_dict().items()}
        self.learner.load_state_dict(self.ema.module.state_dict())
        try:
            yield
        finally:
            self.learner.load_state_dict(own)

    @property
    def has_average(self) -> bool:
        """True once the moving average holds at least one optimiser step."""
        return self.ema is not None and int(self.ema.n_averaged) > 0

    def train_episode(self, index: int):
        """Meta-training episode ``index``; its shot is drawn from ``train_shots`` (seeded by the
        index alone, so a resumed run draws the same shots)."""
        shots = self.train_shots
        shot = shots[0] if len(shots) == 1 else shots[int(np.random.default_rng([self.config.seed, 11, index]).integers(len(shots)))]
        return self.train_samplers[shot].episode(index)

    def start_phase(self, phase: str) -> None:
        """Fresh optimiser and schedule for ``"pretrain"`` or ``"episodic"``."""
        from medmeta.training.episodic import start_episodic
        from medmeta.training.pretrain import start_pretraining

        self.phase = phase
        start_pretraining(self) if phase == "pretrain" else start_episodic(self)

    @property
    def backbone_frozen(self) -> bool:
        return self.config.backbone_lr == 0

    def train_mode(self) -> None:
        """Training mode for episodic training; a frozen backbone stays in evaluation mode (its
        normalisation statistics are part of what is frozen)."""
        self.learner.train()
        if self.phase != "pretrain" and self.backbone_frozen:
            self.learner.backbone.eval()


def train(config: TrainConfig, resume: bool = False, quiet: bool = False, overwrite: bool = False) -> TrainResult:
    """Run (or resume) training as described by ``config``; returns where the checkpoint is.

    The config is validated first (:meth:`TrainConfig.validate`); the effective config is
    written to ``<out>/config.yaml`` (give it to ``medmeta train --config`` to train again).
    A fresh run into a folder that already holds one is refused unless ``overwrite``: a good
    model is never replaced silently. The run folder is locked for the whole run
    (:func:`medmeta.output_folder.output_lock`): a second command writing it is refused."""
    from medmeta.io import check_output_folder
    from medmeta.output_folder import output_lock
    from medmeta.training.distributed import Processes, stop
    from medmeta.training.resume import resumed_config

    if resume:
        config = resumed_config(config)
    config.validate(resume=resume)
    check_output_folder(config.out, overwrite=True)  # a file, or an unwritable parent: said before any work
    processes = Processes.from_environment()
    # one command at a time in a run folder; of several training processes, process 0 writes it
    with output_lock(config.out) if processes.is_main else nullcontext():
        if not resume and not overwrite:
            _refuse_existing_run(Path(config.out))
        try:
            return _train(config, resume, quiet, processes)
        finally:
            stop(processes)


def _train(config: TrainConfig, resume: bool, quiet: bool, processes: Any) -> TrainResult:
    from medmeta.allocator import keep_freed_memory
    from medmeta.training.calibration import calibrate_best, print_calibration, print_heads
    from medmeta.training.config_file import write_config_file
    from medmeta.training.episodic import meta_train
    from medmeta.training.resume import save_state

    keep_freed_memory()
    torch.manual_seed(config.seed)
    run = Run(config, quiet=quiet, processes=processes)
    run.out.mkdir(parents=True, exist_ok=True)
    if processes.is_main:
        write_config_file(run.config, run.out)  # with what the protocol decided filled in
    _announce(run)
    run.load_images()
    _start(run, resume)
    meta_train(run)
    save_state(run)
    if not processes.is_main:  # process 0 calibrates and reports
        return TrainResult(out=run.out, checkpoint=run.out / "best.json", best_val=run.best_val, calibration=None,
                           episodes_done=run.episode, episodes_per_second=run.episodes_per_second)
    record = calibrate_best(run)
    if not quiet:
        best = run.best_val
        console.print(
            f"Best val accuracy {best['accuracy']:.3f} ± {best.get('accuracy_ci95', float('nan')):.3f} "
            f"({best.get('phase')}, episode {best.get('episode')}{', weight average' if best.get('weights') == 'average' else ''})."
        )
        print_calibration(record)
        print_heads(run.heads, record)
        console.print(f"Checkpoint: {run.out / 'best.json'} (+ best.safetensors)")
    return TrainResult(
        out=run.out, checkpoint=run.out / "best.json", best_val=run.best_val, calibration=record,
        episodes_done=run.episode, episodes_per_second=run.episodes_per_second, history=run.history,
    )


def _refuse_existing_run(out: Path) -> None:
    held = [name for name in ("best.json", "last.json") if (out / name).is_file()]
    if held:
        raise ConfigError(
            f"{out}: already holds a training run ({', '.join(held)}); continue it with --resume, "
            "replace it with --overwrite, or choose another --out",
            "out",
        )


def _announce(run: Run) -> None:
    if run.quiet:
        return
    classes = run.protocol.classes
    console.print(
        f"Training [bold]{run.config.method}[/] on {run.protocol.name}: {len(classes['train'])} train / "
        f"{len(classes['val'])} val / {len(classes['test'])} test classes, "
        f"{run.way}-way {run.shot}-shot {run.query}-query, device {run.device}, {run.precision}"
        + (f", {run.processes.world_size} processes" if run.processes.distributed else "")
    )


def _start(run: Run, resume: bool) -> None:
    """Restore the saved state, or start from scratch; pre-train when that phase is not done.
    Leaves the run at the start of (or within) episodic training."""
    from medmeta.training.build import init_backbone
    from medmeta.training.pretrain import pretrain
    from medmeta.training.resume import load_state
    from medmeta.training.selection import validate

    if resume:
        load_state(run)
        if not run.quiet:
            console.print(f"Resumed from {run.out / 'last.json'} at {run.phase} epoch {run.epoch}, episode {run.episode}")
    else:
        init_backbone(run.learner, run.config, quiet=run.quiet)  # --init-from / --backbone-weights: fresh runs only
        if run.config.pretrain_epochs > 0:
            run.start_phase("pretrain")
        else:
            run.start_phase("episodic")
            validate(run, label="at initialisation")
    if run.phase == "pretrain":
        if run.epoch < run.config.pretrain_epochs * run.config.pretrain_generations:
            pretrain(run)
        run.start_phase("episodic")
