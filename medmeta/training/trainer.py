"""The training loop: pre-training, episodic meta-training, model selection, calibration, resume."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medmeta.backbones import create_backbone
from medmeta.calibration import ConformalPredictor, DistanceThreshold, TemperatureScaler, expected_calibration_error, softmax
from medmeta.checkpoint import (
    load_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
    save_tensors,
    update_checkpoint_meta,
)
from medmeta.data.augment import Augmenter
from medmeta.data.episodes import EpisodeSampler
from medmeta.data.protocol import Protocol, load_protocol
from medmeta.data.reading import Preprocessing, ScanReader
from medmeta.data.store import ImageStore
from medmeta.device import resolve_device
from medmeta.errors import CalibrationError, CheckpointError, MedmetaError, ProtocolError
from medmeta.evaluation import run_episodes, summarize
from medmeta.io import atomic_write_json, json_safe
from medmeta.methods import MetaLearner, create_method
from medmeta.progress import console, make_progress
from medmeta.training.config import TrainConfig

STATE_FORMAT = "medmeta-train-state"
# Seed offsets keep the episode streams of training, model selection and calibration apart.
VAL_SEED_OFFSET = 1_000_003
CALIBRATION_SEED_OFFSET = 2_000_003


@dataclass
class TrainResult:
    out: Path
    checkpoint: Path
    best_val: dict[str, float]
    calibration: dict[str, Any]
    episodes_done: int
    episodes_per_second: float
    history: list[dict[str, Any]] = field(default_factory=list)


def backbone_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The method's backbone defaults, overridden by the user's ``backbone_kwargs``."""
    from medmeta.methods.registry import METHODS

    defaults = dict(getattr(METHODS.get(config.method), "backbone_defaults", {}))
    return {"in_channels": config.channels, **defaults, **config.backbone_kwargs}


def build_learner(config: TrainConfig) -> MetaLearner:
    try:
        backbone = create_backbone(config.backbone, **backbone_kwargs(config))
        return create_method(config.method, backbone, **config.method_kwargs)
    except (TypeError, ValueError) as exc:
        raise MedmetaError(f"cannot build {config.method} on {config.backbone}: {exc}") from None


def init_backbone(learner: MetaLearner, config: TrainConfig) -> None:
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
    import inspect

    from medmeta.backbones.registry import BACKBONES

    params = inspect.signature(BACKBONES.get(backbone)).parameters
    full = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    full.update(kwargs)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}


def _episode_shape(config: TrainConfig, protocol: Protocol) -> tuple[int, int, int]:
    way = config.way or protocol.episodes.way
    shot = config.shot or max(protocol.episodes.shot)
    query = config.query or protocol.episodes.query
    return way, shot, query


class _Run:
    """State of one training run; ``train()`` below is the entry point."""

    def __init__(self, config: TrainConfig, quiet: bool = False):
        self.config = config
        self.quiet = quiet
        self.out = Path(config.out)
        self.device = resolve_device(config.device)
        self.protocol = load_protocol(config.protocol)
        self.way, self.shot, self.query = _episode_shape(config, self.protocol)
        self.train_shots = sorted({int(s) for s in config.train_shots}) if config.train_shots else [self.shot]
        if min(self.train_shots) < 1:
            raise ValueError(f"train_shots must be positive, got {config.train_shots}")
        self.protocol.check_counts(max(self.shot, *self.train_shots), self.query, splits=("train",))
        self.val_way = min(self.way, len(self.protocol.classes["val"]))
        self.preprocessing = Preprocessing(image_size=config.image_size, channels=config.channels)
        self.store = ImageStore(ScanReader(self.preprocessing))
        self.learner = build_learner(config)
        if config.init_from:
            init_backbone(self.learner, config)
        self.learner.to(self.device)
        self.augment = Augmenter(config.augment, seed=config.seed)
        self.history: list[dict[str, Any]] = []
        self.best_val: dict[str, float] = {"accuracy": -1.0}
        self.phase, self.epoch, self.episode = "pretrain", 0, 0
        self.train_seconds = 0.0
        self.head: nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None

    # ---- data ------------------------------------------------------------------------------
    def load_images(self) -> None:
        """Decode and cache train and val images once; unreadable files are reported and dropped."""
        splits = ("train", "val")
        records = [r for s in splits for c in self.protocol.classes[s] for r in self.protocol.records[c]]
        with make_progress(transient=True, disable=self.quiet) as progress:
            task = progress.add_task("Decoding scans", total=len(records), status="")
            _, bad = self.store.warm(records, on_progress=lambda: progress.advance(task))
        if bad:
            console.print(f"[yellow]{len(bad)} unreadable file(s) skipped[/], e.g. {bad[0][0].key}: {bad[0][1]}")
            bad_keys = {r.key for r, _ in bad}
            for name in list(self.protocol.records):
                self.protocol.records[name] = [r for r in self.protocol.records[name] if r.key not in bad_keys]
            self.protocol.check_counts(max(self.shot, *self.train_shots), self.query, splits=("train",))
        self.train_samplers = {
            shot: EpisodeSampler(self.protocol.split_records("train"), self.way, shot, self.query, self.config.seed)
            for shot in self.train_shots
        }
        self.val_sampler = EpisodeSampler(
            self.protocol.split_records("val"), self.val_way, self.shot, self.query, self.config.seed + VAL_SEED_OFFSET
        )
        self.calibration_sampler = EpisodeSampler(
            self.protocol.split_records("val"), self.val_way, self.shot, self.query, self.config.seed + CALIBRATION_SEED_OFFSET
        )

    def train_episode(self, index: int):
        """Meta-training episode ``index``; its shot is drawn from ``train_shots`` (seeded by the
        index alone, so a resumed run draws the same shots)."""
        shots = self.train_shots
        shot = shots[0] if len(shots) == 1 else shots[int(np.random.default_rng([self.config.seed, 11, index]).integers(len(shots)))]
        return self.train_samplers[shot].episode(index)

    # ---- optimisers ------------------------------------------------------------------------
    def start_phase(self, phase: str) -> None:
        cfg = self.config
        self.phase = phase
        if phase == "pretrain":
            n_classes = len(self.protocol.classes["train"])
            torch.manual_seed(cfg.seed)
            self.head = nn.Linear(self.learner.backbone.num_features, n_classes).to(self.device)
            params = list(self.learner.backbone.parameters()) + list(self.head.parameters())
            self.optimizer = torch.optim.SGD(params, lr=cfg.pretrain_lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, cfg.pretrain_epochs))
        else:
            self.head = None
            self.optimizer = torch.optim.Adam(self.episodic_param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)

    @property
    def backbone_frozen(self) -> bool:
        return self.config.backbone_lr == 0

    def episodic_param_groups(self) -> list[dict[str, Any]]:
        """The method's own parameters at ``lr``; the backbone's at ``backbone_lr`` (left out, and
        frozen, when that is 0)."""
        cfg = self.config
        if cfg.backbone_lr is None:  # one group, in the module's own order (as older runs' saved optimisers)
            return [{"params": list(self.learner.parameters())}]
        backbone = list(self.learner.backbone.parameters())
        ids = {id(p) for p in backbone}
        own = [p for p in self.learner.parameters() if id(p) not in ids]
        self.learner.backbone.requires_grad_(not self.backbone_frozen)
        groups = [{"params": own}] if own else []
        if not self.backbone_frozen:
            groups.append({"params": backbone, "lr": cfg.backbone_lr})
        if not groups:
            raise ValueError(f"method {cfg.method!r} has no parameters besides the backbone; --backbone-lr 0 would train nothing")
        return groups

    def train_mode(self) -> None:
        """Training mode for episodic training; a frozen backbone stays in evaluation mode (its
        normalisation statistics are part of what is frozen)."""
        self.learner.train()
        if self.phase != "pretrain" and self.backbone_frozen:
            self.learner.backbone.eval()

    # ---- pre-training ----------------------------------------------------------------------
    def pretrain(self) -> None:
        cfg = self.config
        names = self.protocol.classes["train"]
        records = [r for i, n in enumerate(names) for r in self.protocol.records[n]]
        labels = torch.tensor([i for i, n in enumerate(names) for _ in self.protocol.records[n]])
        batch = cfg.pretrain_batch_size
        n_batches = max(1, len(records) // batch)
        self.learner.train()
        assert self.head is not None and self.optimizer is not None
        with make_progress(disable=self.quiet) as progress:
            task = progress.add_task("Pre-training", total=cfg.pretrain_epochs * n_batches, completed=self.epoch * n_batches, status="")
            while self.epoch < cfg.pretrain_epochs:
                order = np.random.default_rng([cfg.seed, 7, self.epoch]).permutation(len(records))
                correct = seen = 0
                started = time.perf_counter()
                for b in range(n_batches):
                    idx = order[b * batch : (b + 1) * batch]
                    images = self.augment(self.store.stack([records[i] for i in idx]), step=(self.epoch + 1) * 1_000_000 + b)
                    target = labels[idx].to(self.device)
                    logits = self.head(self.learner.backbone(images.to(self.device)))
                    loss = F.cross_entropy(logits, target)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    correct += int((logits.argmax(1) == target).sum())
                    seen += len(idx)
                    progress.update(task, advance=1, status=f"epoch {self.epoch + 1} loss {loss.item():.3f} acc {correct / seen:.3f}")
                self.scheduler.step()
                self.train_seconds += time.perf_counter() - started
                self.epoch += 1
                self.save_state()
        self.validate(label="after pre-training")

    # ---- episodic meta-training ------------------------------------------------------------
    def meta_train(self) -> None:
        cfg = self.config
        assert self.optimizer is not None
        self.train_mode()
        losses: list[float] = []
        accs: list[float] = []
        episodes_this_session = 0
        started_session = time.perf_counter()
        with make_progress(disable=self.quiet) as progress:
            task = progress.add_task("Meta-training", total=cfg.episodes, completed=self.episode, status="")
            while self.episode < cfg.episodes:
                if cfg.max_minutes is not None and self.train_seconds >= cfg.max_minutes * 60:
                    console.print(f"Time budget of {cfg.max_minutes} min reached at episode {self.episode}.")
                    if not self.history or self.history[-1]["episode"] != self.episode:
                        self.validate(label=f"episode {self.episode} (end of the time budget)")
                    break
                started = time.perf_counter()
                # one optimiser step per meta-batch of episodes (the mean of their losses)
                batch = range(self.episode, min(self.episode + cfg.meta_batch, cfg.episodes))
                self.optimizer.zero_grad(set_to_none=True)
                step_losses, step_accs = [], []
                for index in batch:
                    ep = self.train_episode(index)
                    images = self.augment(self.store.stack(ep.support + ep.query), step=index)
                    support, query = images[: len(ep.support)].to(self.device), images[len(ep.support) :].to(self.device)
                    loss, logits = self.learner.episode_loss(
                        support, ep.support_labels.to(self.device), query, ep.query_labels.to(self.device)
                    )
                    (loss / len(batch)).backward()
                    step_losses.append(loss.item())
                    step_accs.append(float((logits.argmax(1).cpu() == ep.query_labels).float().mean()))
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(
                        [p for group in self.optimizer.param_groups for p in group["params"]], cfg.grad_clip
                    )
                self.optimizer.step()
                for _ in batch:
                    self.scheduler.step()
                previous = self.episode
                self.episode += len(batch)
                episodes_this_session += len(batch)
                self.train_seconds += time.perf_counter() - started
                losses += step_losses
                accs += step_accs
                window = slice(-50, None)
                progress.update(
                    task, advance=len(batch), status=f"loss {np.mean(losses[window]):.3f} acc {np.mean(accs[window]):.3f}"
                )
                if self.episode // cfg.val_interval > previous // cfg.val_interval or self.episode == cfg.episodes:
                    self.validate(label=f"episode {self.episode}")
                    self.save_state()
                    self.train_mode()
        self.episodes_per_second = episodes_this_session / max(1e-9, time.perf_counter() - started_session)

    # ---- model selection ---------------------------------------------------------------------
    def validate(self, label: str) -> None:
        cfg = self.config
        outputs = run_episodes(self.learner, self.store, self.val_sampler, range(cfg.val_episodes), self.device)
        stats = summarize(outputs)
        # no prediction sets or referral during model selection: leave their (None) entries out
        entry = {"phase": self.phase, "epoch": self.epoch, "episode": self.episode, **{k: v for k, v in stats.items() if v is not None}}
        self.history.append(entry)
        improved = stats["accuracy"] > self.best_val["accuracy"]
        if improved:
            self.best_val = {"accuracy": stats["accuracy"], "accuracy_ci95": stats["accuracy_ci95"], "episode": self.episode, "phase": self.phase}
            save_checkpoint(self.out / "best.json", self.learner, self.checkpoint_meta())
        if not self.quiet:
            mark = " [green](best, saved)[/]" if improved else ""
            console.print(
                f"Validation {label}: accuracy {stats['accuracy']:.3f} ± {stats['accuracy_ci95']:.3f} "
                f"({cfg.val_episodes} {self.val_way}-way {self.shot}-shot episodes on val classes){mark}"
            )

    def checkpoint_meta(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "method": {"name": cfg.method, "hparams": self.learner.hparams()},
            "backbone": {"name": cfg.backbone, "kwargs": backbone_kwargs(cfg)},
            "preprocessing": self.preprocessing.to_dict(),
            "protocol": self.protocol.to_dict(),
            "training": {
                "config": cfg.to_dict(),
                "episode_shape": {"way": self.way, "shot": self.shot, "query": self.query, "train_shots": self.train_shots},
                "phase": self.phase,
                "pretrain_epochs_done": self.epoch,
                "episodes_done": self.episode,
                "best_val": self.best_val,
                "history": self.history,
                "device": str(self.device),
            },
            "calibration": {"method": "none", "temperature": 1.0},
        }

    # ---- calibration -------------------------------------------------------------------------
    def calibrate(self) -> dict[str, Any]:
        """Calibrate the best model on val-class episodes (see :func:`fit_calibration`) and store
        the result in ``best.json``."""
        cfg = self.config
        self.learner.load_state_dict(load_tensors(self.out / "best.safetensors"))
        calibration = fit_calibration(
            self.learner, self.store, self.calibration_sampler, self.val_sampler, cfg, self.device
        )
        update_checkpoint_meta(self.out / "best.json", calibration=calibration)
        return calibration

    # ---- resume state ------------------------------------------------------------------------
    def save_state(self) -> None:
        assert self.optimizer is not None
        tensors = {f"model.{k}": v for k, v in self.learner.state_dict().items()}
        if self.head is not None:
            tensors.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        optim_tensors, optim_rest = optimizer_to_tensors(self.optimizer.state_dict(), "optim")
        tensors.update(optim_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        save_tensors(self.out / "last.safetensors", tensors)
        atomic_write_json(
            self.out / "last.json",
            {
                "format": STATE_FORMAT,
                "config": self.config.to_dict(),
                "phase": self.phase,
                "epoch": self.epoch,
                "episode": self.episode,
                "train_seconds": self.train_seconds,
                "optimizer": optim_rest,
                "scheduler": self.scheduler.state_dict(),
                "best_val": self.best_val,
                "history": self.history,
            },
        )

    def load_state(self) -> None:
        path = self.out / "last.json"
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot resume, no readable training state ({exc})") from None
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path}: not a medmeta training state")
        tensors = load_tensors(self.out / "last.safetensors")
        self.learner.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.epoch, self.episode = int(state["epoch"]), int(state["episode"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.best_val, self.history = state["best_val"], state["history"]
        self.start_phase(state["phase"])
        if self.head is not None:
            self.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        assert self.optimizer is not None
        self.optimizer.load_state_dict(optimizer_from_tensors(tensors, state["optimizer"], "optim"))
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])


def fit_calibration(
    learner: MetaLearner,
    store: ImageStore,
    calibration_sampler: EpisodeSampler,
    val_sampler: EpisodeSampler,
    cfg: TrainConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Calibrate ``learner`` on ``cfg.calibration_episodes`` episodes of ``calibration_sampler``
    (val classes, query cases pooled): fit a temperature, then a split conformal predictor on the
    temperature-scaled probabilities (Mondrian over the val class names when
    ``cfg.class_conditional``) and the out-of-distribution distance threshold. ECE, coverage,
    set size and the distance flag rate are also reported on ``cfg.val_episodes`` disjoint
    episodes of ``val_sampler``. Returns the checkpoint's ``calibration`` entry (JSON-safe)."""
    fit_out = run_episodes(learner, store, calibration_sampler, range(cfg.calibration_episodes), device)
    logits, labels = fit_out.pooled()
    scaler = TemperatureScaler().fit(logits, labels)
    probs = softmax(logits / scaler.temperature_)
    conformal = ConformalPredictor(cfg.conformal_score, cfg.coverage, cfg.class_conditional).fit(
        probs, labels, classes=fit_out.pooled_class_names()
    )
    distance = DistanceThreshold(cfg.refer_share).fit(fit_out.pooled_distances())
    held_out = summarize(
        run_episodes(learner, store, val_sampler, range(cfg.val_episodes), device),
        temperature=scaler.temperature_,
        conformal=conformal,
        distance_threshold=distance.threshold_,
    )
    fitted_on = f"{cfg.calibration_episodes} val-class episodes ({calibration_sampler.way}-way {calibration_sampler.shot}-shot)"
    calibration = {
        "method": "temperature",
        "temperature": scaler.temperature_,
        "fitted_on": fitted_on,
        "n_bins": 15,
        "ece_before_fit_episodes": expected_calibration_error(softmax(logits), labels),
        "ece_after_fit_episodes": expected_calibration_error(probs, labels),
        "ece_before_val": held_out["ece_before"],
        "ece_after_val": held_out["ece_after"],
        "conformal": {
            **conformal.to_dict(),
            "fitted_on": f"query cases of the {fitted_on}, temperature-scaled",
            "coverage_val": held_out["coverage"],
            "mean_set_size_val": held_out["mean_set_size"],
        },
        "referral": {
            "share": float(cfg.refer_share),
            "distance_threshold": distance.threshold_,
            "n_calibration": distance.n_calibration_,
            "distance_flag_rate_val": held_out["referral_rate_distance"],
            "referral_rate_val": held_out["referral_rate"],
        },
    }
    return json_safe(calibration)


def print_calibration(calibration: dict[str, Any]) -> None:
    """One paragraph on the fitted calibration, for the console."""
    console.print(
        f"Temperature {calibration['temperature']:.3f}: ECE (15 bins, held-out val episodes) "
        f"{calibration['ece_before_val']:.3f} -> {calibration['ece_after_val']:.3f}",
        highlight=False,
    )
    conformal, referral = calibration["conformal"], calibration["referral"]
    console.print(
        f"Conformal sets ({conformal['score']}{', class-conditional' if conformal['class_conditional'] else ''}, "
        f"target coverage {conformal['coverage']:.0%}): coverage {_fmt(conformal['coverage_val'])}, mean set size "
        f"{_fmt(conformal['mean_set_size_val'])} on held-out val episodes; distance threshold "
        f"{_fmt(referral['distance_threshold'])} flags {_fmt(referral['distance_flag_rate_val'])} of them, "
        f"{_fmt(referral['referral_rate_val'])} referred in all",
        highlight=False,
    )


def recalibrate(
    checkpoint: str | Path,
    shot: int | None = None,
    coverage: float | None = None,
    conformal_score: str | None = None,
    class_conditional: bool | None = None,
    refer_share: float | None = None,
    calibration_episodes: int | None = None,
    device: str = "auto",
    quiet: bool = False,
    method_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Refit the calibration of an existing checkpoint on its protocol's val classes (e.g. for
    another coverage or shot) and rewrite its sidecar; the weights are untouched. Episodes use
    the training run's seeds, so the result equals what training would have stored.

    ``method_options`` changes method hyperparameters that do not touch the weights before the
    refit (e.g. ``{"distance": "euclidean"}`` for ProtoNet: same predictions, other
    probabilities); the sidecar's method record is rewritten with them and the calibration
    record lists them under ``method_options``."""
    from medmeta.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    try:
        cfg = TrainConfig.from_dict(ckpt.meta["training"]["config"])
        trained_shape = ckpt.meta["training"]["episode_shape"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{ckpt.path}: no training record to recalibrate from") from None
    for name, value in (("coverage", coverage), ("conformal_score", conformal_score), ("class_conditional", class_conditional),
                        ("refer_share", refer_share), ("calibration_episodes", calibration_episodes)):
        if value is not None:
            setattr(cfg, name, value)
    check_calibration_settings(cfg)
    protocol = load_protocol(ckpt.meta["protocol"]["path"])
    shot = shot or int(trained_shape["shot"])
    query = int(trained_shape["query"])
    protocol.check_counts(shot, query, splits=("val",))
    way = min(int(trained_shape["way"]), len(protocol.classes["val"]))
    from medmeta.checkpoint import build_learner as build_from_checkpoint

    if method_options:
        ckpt.meta["method"] = {**ckpt.meta["method"], "hparams": {**ckpt.meta["method"].get("hparams", {}), **method_options}}
    torch_device = resolve_device(device)
    learner = build_from_checkpoint(ckpt).to(torch_device)
    store = ImageStore(ScanReader(Preprocessing.from_dict(ckpt.meta["preprocessing"])))
    val = protocol.split_records("val")
    calibration_sampler = EpisodeSampler(val, way, shot, query, cfg.seed + CALIBRATION_SEED_OFFSET)
    val_sampler = EpisodeSampler(val, way, shot, query, cfg.seed + VAL_SEED_OFFSET)
    calibration = fit_calibration(learner, store, calibration_sampler, val_sampler, cfg, torch_device)
    if method_options:
        calibration["method_options"] = dict(method_options)
    update_checkpoint_meta(ckpt.path, calibration=calibration, method=ckpt.meta["method"])
    return calibration


def _resumed_config(config: TrainConfig) -> TrainConfig:
    """On resume the stored configuration wins, except the budget and the device."""
    path = Path(config.out) / "last.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))["config"]
    except (OSError, KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: nothing to resume (no readable training state in {config.out})") from None
    merged = TrainConfig.from_dict(stored)
    merged.episodes, merged.device, merged.max_minutes = config.episodes, config.device, config.max_minutes
    return merged


def check_calibration_settings(config: TrainConfig) -> None:
    """Refuse invalid conformal/referral settings before any training time is spent."""
    from medmeta.calibration.conformal import SCORES

    if config.conformal_score not in SCORES:
        raise CalibrationError(f"unknown conformal score {config.conformal_score!r}; choose from {', '.join(SCORES)}")
    if not 0.0 < config.coverage < 1.0:
        raise CalibrationError(f"target coverage must be between 0 and 1 (exclusive), got {config.coverage}")
    if not 0.0 <= config.refer_share < 1.0:
        raise CalibrationError(f"the share of cases to refer must be in [0, 1), got {config.refer_share}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def train(config: TrainConfig, resume: bool = False, quiet: bool = False) -> TrainResult:
    """Run (or resume) training as described by ``config``; returns where the checkpoint is."""
    if resume:
        config = _resumed_config(config)
    if config.episodes < 0 or config.pretrain_epochs < 0:
        raise ProtocolError("episodes and pretrain epochs must be >= 0")
    check_calibration_settings(config)
    torch.manual_seed(config.seed)
    run = _Run(config, quiet=quiet)
    run.out.mkdir(parents=True, exist_ok=True)
    if not quiet:
        console.print(
            f"Training [bold]{config.method}[/] on {run.protocol.name}: {len(run.protocol.classes['train'])} train / "
            f"{len(run.protocol.classes['val'])} val / {len(run.protocol.classes['test'])} test classes, "
            f"{run.way}-way {run.shot}-shot {run.query}-query, device {run.device}"
        )
    run.load_images()
    if resume:
        run.load_state()
        if not quiet:
            console.print(f"Resumed from {run.out / 'last.json'} at {run.phase} epoch {run.epoch}, episode {run.episode}")
    elif config.pretrain_epochs > 0:
        run.start_phase("pretrain")
    else:
        run.start_phase("episodic")
        run.validate(label="at initialisation")
    if run.phase == "pretrain":
        if run.epoch < config.pretrain_epochs:
            run.pretrain()
        run.start_phase("episodic")
    run.episodes_per_second = 0.0
    run.meta_train()
    run.save_state()
    calibration = run.calibrate()
    if not quiet:
        console.print(
            f"Best val accuracy {run.best_val['accuracy']:.3f} ± {run.best_val.get('accuracy_ci95', float('nan')):.3f} "
            f"({run.best_val.get('phase')}, episode {run.best_val.get('episode')})."
        )
        print_calibration(calibration)
        console.print(f"Checkpoint: {run.out / 'best.json'} (+ best.safetensors)")
    return TrainResult(
        out=run.out,
        checkpoint=run.out / "best.json",
        best_val=run.best_val,
        calibration=calibration,
        episodes_done=run.episode,
        episodes_per_second=run.episodes_per_second,
        history=run.history,
    )
