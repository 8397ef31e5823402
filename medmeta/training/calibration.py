"""Phase 3: calibrating the best model on val-class episodes (temperature, conformal sets,
referral threshold), at the end of training and again with ``medmeta calibrate``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medmeta.progress import console
from medmeta.training.bars import episode_bar
from medmeta.training.config import TrainConfig

if TYPE_CHECKING:
    import torch

    from medmeta.calibration import CalibrationRecord
    from medmeta.data.episodes import EpisodeSampler
    from medmeta.data.store import ImageStore
    from medmeta.evaluation import EpisodeOutputs, EpisodeSummary
    from medmeta.methods import MetaLearner
    from medmeta.training.loop import Run

# Seed offsets keep the episode streams of training, model selection and calibration apart.
VAL_SEED_OFFSET = 1_000_003
CALIBRATION_SEED_OFFSET = 2_000_003
N_BINS = 15


def fit_calibration(
    learner: "MetaLearner",
    store: "ImageStore",
    calibration_sampler: "EpisodeSampler",
    val_sampler: "EpisodeSampler",
    cfg: TrainConfig,
    device: "torch.device",
    quiet: bool = False,
    held_out: "EpisodeOutputs | None" = None,
) -> "CalibrationRecord":
    """Calibrate ``learner`` on ``cfg.calibration_episodes`` episodes of ``calibration_sampler``
    (val classes, query cases pooled): fit a temperature, then a split conformal predictor on the
    temperature-scaled probabilities (Mondrian over the val class names when
    ``cfg.class_conditional``) and the out-of-distribution distance threshold. ECE, coverage,
    set size and the distance flag rate are also reported on ``cfg.val_episodes`` disjoint
    episodes of ``val_sampler`` (``held_out``: their outputs, when this learner was already run
    on them, e.g. by the validation that selected it). Returns the record the checkpoint stores."""
    from medmeta.evaluation import summarize

    fit_out = _run("Calibrating", learner, store, calibration_sampler, cfg.calibration_episodes, device, quiet)
    scaler, conformal, distance = _fit_steps(fit_out, cfg)
    if held_out is None:
        held_out = _run("Checking on held-out val episodes", learner, store, val_sampler, cfg.val_episodes, device, quiet)
    evidence = summarize(held_out, temperature=scaler.temperature_, sets=conformal, referral=distance.threshold_)
    fitted_on = f"{cfg.calibration_episodes} val-class episodes ({calibration_sampler.way}-way {calibration_sampler.shot}-shot)"
    return _record(fit_out, (scaler, conformal, distance), evidence, fitted_on, calibration_sampler.shot, cfg.refer_share)


def _run(what: str, learner, store, sampler, n_episodes: int, device, quiet: bool) -> "EpisodeOutputs":
    """Episodes ``0 .. n_episodes - 1`` of ``sampler``, with a progress bar."""
    from medmeta.evaluation import run_episodes

    with episode_bar(what, n_episodes, quiet) as on_episode:
        return run_episodes(learner, store, sampler, range(n_episodes), device, on_episode=on_episode)


def _fit_steps(fit_out: "EpisodeOutputs", cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """The temperature, then the conformal predictor on the scaled probabilities, then the
    distance threshold, all fitted on the pooled query cases of ``fit_out``."""
    from medmeta.calibration import ConformalPredictor, DistanceThreshold, TemperatureScaler, softmax

    logits, labels = fit_out.pooled()
    scaler = TemperatureScaler().fit(logits, labels)
    probs = softmax(logits / scaler.temperature_)
    conformal = ConformalPredictor(cfg.conformal_score, cfg.coverage, cfg.class_conditional).fit(
        probs, labels, classes=fit_out.pooled_class_names()
    )
    distance = DistanceThreshold(cfg.refer_share).fit(fit_out.pooled_distances())
    return scaler, conformal, distance


def _record(fit_out, steps: tuple, held_out: "EpisodeSummary", fitted_on: str, shot: int, share: float) -> "CalibrationRecord":
    """The calibration record: the fitted ``(scaler, conformal, distance)`` steps and their
    evidence (``held_out``: the summary of the held-out val episodes)."""
    from medmeta.calibration import CalibrationRecord, ReferralRecord, expected_calibration_error, softmax

    scaler, conformal, distance = steps
    logits, labels = fit_out.pooled()
    return CalibrationRecord(
        method="temperature",
        temperature=scaler.temperature_,
        fitted_on=fitted_on,
        shot=shot,
        n_bins=N_BINS,
        ece_before_fit_episodes=expected_calibration_error(softmax(logits), labels),
        ece_after_fit_episodes=expected_calibration_error(softmax(logits / scaler.temperature_), labels),
        ece_before_val=held_out.ece_before,
        ece_after_val=held_out.ece_after,
        conformal=conformal,
        conformal_evidence={
            "fitted_on": f"query cases of the {fitted_on}, temperature-scaled",
            "coverage_val": held_out.coverage,
            "mean_set_size_val": held_out.mean_set_size,
        },
        referral=ReferralRecord(
            share=float(share),
            distance_threshold=distance.threshold_,
            n_calibration=distance.n_calibration_,
            distance_flag_rate_val=held_out.referral_rate_distance,
            referral_rate_val=held_out.referral_rate,
        ),
        method_options=None,
    )


def sidecar_entry(record: "CalibrationRecord") -> dict[str, Any]:
    """The JSON-safe ``calibration`` entry of a checkpoint's sidecar."""
    from medmeta.io import json_safe

    return json_safe(record.to_dict())


def calibrate_best(run: "Run") -> "CalibrationRecord":
    """Calibrate the run's best model (see :func:`fit_calibration`) and store the result in
    ``best.json``."""
    from medmeta.checkpoint import load_tensors, update_checkpoint_meta

    run.learner.load_state_dict(load_tensors(run.out / "best.safetensors"))
    record = fit_calibration(
        run.learner, run.store, run.calibration_sampler, run.val_sampler, run.config, run.device, run.quiet, held_out=run.best_outputs
    )
    update_checkpoint_meta(run.out / "best.json", calibration=sidecar_entry(record))
    return record


def print_calibration(record: "CalibrationRecord") -> None:
    """One paragraph on the fitted calibration, for the console."""
    conformal, evidence, referral = record.conformal, record.conformal_evidence, record.referral
    console.print(
        f"Temperature {record.temperature:.3f}: ECE ({record.n_bins} bins, held-out val episodes) "
        f"{_fmt(record.ece_before_val)} -> {_fmt(record.ece_after_val)}",
        highlight=False,
    )
    if conformal is None or referral is None:
        return
    console.print(
        f"Conformal sets ({conformal.score}{', class-conditional' if conformal.class_conditional else ''}, "
        f"target coverage {conformal.coverage:.0%}): coverage {_fmt(evidence.get('coverage_val'))}, mean set size "
        f"{_fmt(evidence.get('mean_set_size_val'))} on held-out val episodes; distance threshold "
        f"{_fmt(referral.distance_threshold)} flags {_fmt(referral.distance_flag_rate_val)} of them, "
        f"{_fmt(referral.referral_rate_val)} referred in all",
        highlight=False,
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


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
) -> "CalibrationRecord":
    """Refit the calibration of an existing checkpoint on its protocol's val classes (e.g. for
    another coverage or shot) and rewrite its sidecar; the weights are untouched. Episodes use
    the training run's seeds, so the result equals what training would have stored.

    ``method_options`` changes method hyperparameters that do not touch the weights before the
    refit (e.g. ``{"distance": "euclidean"}`` for ProtoNet: same predictions, other
    probabilities); the sidecar's method record is rewritten with them and the calibration
    record lists them under ``method_options``. The run folder is locked meanwhile
    (:func:`medmeta.output_folder.output_lock`)."""
    from medmeta.output_folder import output_lock

    folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    with output_lock(folder):  # not while a training or another calibration writes the run folder
        return _recalibrate(checkpoint, shot, coverage, conformal_score, class_conditional, refer_share,
                            calibration_episodes, device, quiet, method_options)


def _recalibrate(checkpoint, shot, coverage, conformal_score, class_conditional, refer_share,
                 calibration_episodes, device, quiet, method_options) -> "CalibrationRecord":
    from medmeta.checkpoint import update_checkpoint_meta
    from medmeta.run import load_run

    run = load_run(checkpoint, device, method_options=method_options or None, allow_unfinished=True)  # calibrating finishes it
    overrides = {"coverage": coverage, "conformal_score": conformal_score, "class_conditional": class_conditional,
                 "refer_share": refer_share, "calibration_episodes": calibration_episodes}
    cfg, (way, trained_shot, query) = _stored_settings(run, {k: v for k, v in overrides.items() if v is not None})
    shot = shot or trained_shot
    _check_recalibration(cfg, shot)
    calibration_sampler = run.sampler("val", way, shot, query, cfg.seed + CALIBRATION_SEED_OFFSET)
    val_sampler = run.sampler("val", way, shot, query, cfg.seed + VAL_SEED_OFFSET)
    record = fit_calibration(run.learner, run.store(), calibration_sampler, val_sampler, cfg, run.device, quiet)
    if method_options:
        record.method_options = dict(method_options)
    update_checkpoint_meta(run.checkpoint.path, calibration=sidecar_entry(record), method=run.checkpoint.meta["method"])
    return record


def _stored_settings(run: Any, overrides: dict[str, Any]) -> tuple[TrainConfig, tuple[int, int, int]]:
    """The training config stored in the checkpoint (with ``overrides``) and the episode shape
    of calibration: ``(way, shot, query)``, the way capped by the number of val classes."""
    from medmeta.errors import CheckpointError

    try:
        cfg = TrainConfig.from_dict(run.checkpoint.meta["training"]["config"])
        trained = run.checkpoint.meta["training"]["episode_shape"]
        shape = (int(trained["way"]), int(trained["shot"]), int(trained["query"]))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{run.checkpoint.path}: no training record to recalibrate from") from None
    for name, value in overrides.items():
        setattr(cfg, name, value)
    way = min(shape[0], len(run.protocol.classes["val"]))
    return cfg, (way, shape[1], shape[2])


def _check_recalibration(cfg: TrainConfig, shot: int) -> None:
    """The calibration settings of a refit: conformal/referral, episodes and shot."""
    from medmeta.training.checks import check_calibration_settings
    from medmeta.training.config import ConfigError

    check_calibration_settings(cfg)
    if cfg.calibration_episodes < 1:
        raise ConfigError(f"the number of calibration episodes must be at least 1, got {cfg.calibration_episodes}", "calibration_episodes")
    if shot < 1:
        raise ConfigError(f"shot must be at least 1, got {shot}", "shot")

