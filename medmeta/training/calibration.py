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
    other_shots: tuple[int, ...] = (),
) -> "CalibrationRecord":
    """Calibrate ``learner`` on ``cfg.calibration_episodes`` episodes of ``calibration_sampler``
    (val classes, query cases pooled): fit a temperature, then a split conformal predictor on the
    temperature-scaled probabilities (Mondrian over the val class names when
    ``cfg.class_conditional``) and the out-of-distribution distance threshold. ECE, coverage,
    set size and the distance flag rate are also reported on ``cfg.val_episodes`` disjoint
    episodes of ``val_sampler`` (``held_out``: their outputs, when this learner was already run
    on them, e.g. by the validation that selected it). For each of ``other_shots`` a temperature
    alone is fitted on as many episodes of that shot (:func:`fit_shot_temperatures`). Returns
    the record the checkpoint stores."""
    from medmeta.evaluation import summarize

    fit_out = _run("Calibrating", learner, store, calibration_sampler, cfg.calibration_episodes, device, quiet)
    scaler, conformal, distance = _fit_steps(fit_out, cfg)
    if held_out is None:
        held_out = _run("Checking on held-out val episodes", learner, store, val_sampler, cfg.val_episodes, device, quiet)
    evidence = summarize(held_out, temperature=scaler.temperature_, sets=conformal, referral=distance.threshold_)
    fitted_on = f"{cfg.calibration_episodes} val-class episodes ({calibration_sampler.way}-way {calibration_sampler.shot}-shot)"
    record = _record(fit_out, (scaler, conformal, distance), evidence, fitted_on, calibration_sampler.shot, cfg.refer_share)
    record.shot_temperatures = fit_shot_temperatures(learner, store, calibration_sampler, other_shots, cfg.calibration_episodes, device, quiet)
    return record


def fit_shot_temperatures(learner, store, calibration_sampler: "EpisodeSampler", shots, n_episodes: int, device, quiet: bool = False) -> dict[int, float]:
    """``{shot: temperature}``: a temperature fitted on ``n_episodes`` val-class episodes of each
    of ``shots`` (other than ``calibration_sampler``'s own), drawn as ``calibration_sampler``'s
    are (same classes, way, query and seed) but with that many support scans per class. Fewer
    support scans spread a model's probabilities differently (at 1-shot the validation
    temperature fitted at 5-shot left the test ECE at 0.150 on derm-rare against 0.048 when
    fitted at 1-shot; docs/benchmarks.md). A shot that some val class has too few scans for is
    left out."""
    from medmeta.calibration import TemperatureScaler
    from medmeta.data.episodes import EpisodeSampler
    from medmeta.errors import ProtocolError

    fitted = {}
    for shot in sorted(set(int(s) for s in shots) - {calibration_sampler.shot}):
        try:
            sampler = EpisodeSampler(
                calibration_sampler.records_by_class, calibration_sampler.way, shot, calibration_sampler.query, calibration_sampler.seed
            )
        except ProtocolError:
            continue
        out = _run(f"Calibrating the {shot}-shot temperature", learner, store, sampler, n_episodes, device, quiet)
        fitted[shot] = float(TemperatureScaler().fit(*out.pooled()).temperature_)
    return fitted


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
        accuracy_fit_episodes=float((logits.argmax(1) == labels).mean()),
        accuracy_val=held_out.accuracy,
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


#: The embedding heads calibrated at the end of training, beside the method's own: ``(head,
#: transductive refiner or None)``. Transductive ones are calibrated but never chosen as the
#: default: val episodes have balanced batches, which flatters them (docs/transductive.md).
TRAINED_HEADS = (("prototype", None), ("logistic", None), ("finetune", None), ("prototype", "soft_kmeans"))
#: At most this many meta-train scans (evenly spaced) give the embedding normaliser its mean.
NORMALISER_SCANS = 2000


def calibrate_best(run: "Run") -> "CalibrationRecord":
    """Calibrate the run's best model (see :func:`fit_calibration`) with its own head, learn the
    embedding normaliser on the meta-train scans, calibrate every head of
    :data:`TRAINED_HEADS` the same way, choose the default head on the calibration episodes, and
    store it all in ``best.json``. Returns the method head's record."""
    from medmeta.checkpoint import load_tensors, update_checkpoint_meta

    with run.checkpoint_layout():  # so that adapt, evaluate and calibrate reproduce these figures
        run.learner.load_state_dict(load_tensors(run.out / "best.safetensors"))
        shots = tuple(run.protocol.episodes.shot)
        record = fit_calibration(
            run.learner, run.store, run.calibration_sampler, run.val_sampler, run.config, run.device, run.quiet, held_out=run.best_outputs,
            other_shots=shots,
        )
        normaliser = fit_normaliser(run.learner, run.store, train_records(run.protocol), run.device)
        heads = calibrate_heads(
            run.learner, normaliser, record, run.store, run.calibration_sampler, run.val_sampler, run.config, run.device, run.quiet,
            other_shots=shots,
        )
        update_checkpoint_meta(
            run.out / "best.json", calibration=sidecar_entry(record), embedding_normaliser=normaliser.to_dict(), heads=heads
        )
        run.heads = heads
    return record


def train_records(protocol) -> list:
    """The meta-train scans of ``protocol``, class by class."""
    return [r for name in protocol.classes["train"] for r in protocol.records[name]]


def fit_normaliser(learner, store, records, device, limit: int = NORMALISER_SCANS):
    """The :class:`~medmeta.heads.EmbeddingNormaliser` (centring + L2) fitted on the backbone
    embeddings of at most ``limit`` evenly spaced ``records`` (meta-train scans)."""
    import numpy as np
    import torch

    from medmeta.heads import EmbeddingNormaliser

    from medmeta.embedded import embed_batch_size

    chosen = [records[i] for i in np.unique(np.linspace(0, len(records) - 1, min(limit, len(records))).round().astype(int))]
    step = embed_batch_size(store.get(chosen[0]).numel()) if chosen else 1
    was_training = learner.training
    learner.eval()
    try:
        with torch.no_grad():
            parts = [
                learner.backbone(store.stack(chosen[start : start + step]).to(device)).double().cpu()
                for start in range(0, len(chosen), step)
            ]
    finally:
        learner.train(was_training)
    return EmbeddingNormaliser("center_l2").fit(torch.cat(parts))


def calibrate_heads(learner, normaliser, method_record, store, calibration_sampler, val_sampler, cfg, device, quiet,
                    names: tuple[tuple[str, str | None], ...] = TRAINED_HEADS, previous: dict[str, Any] | None = None,
                    other_shots: tuple[int, ...] = ()) -> dict[str, Any]:
    """Calibrate each ``(head, transductive refiner)`` of ``names`` on ``learner``'s backbone
    (as :func:`fit_calibration` does for the method's own) and choose the default among the
    inductive heads: among those whose accuracy on the calibration episodes (val classes drawn
    apart from those that selected the checkpoint) is within one standard error of the best, the
    best calibrated on the held-out val episodes, then the cheapest (:func:`choose_head`). The
    ``finetune`` head's steps and rate are first chosen on val episodes of their own
    (:func:`~medmeta.training.head_tuning.tune_finetune`; the grid's scores are kept under
    ``tuning``). Each head also gets a temperature per shot of ``other_shots``. Returns the
    sidecar's ``heads`` entry; ``previous`` (an existing entry) keeps its other heads."""
    from medmeta.heads import adapting_learner, create_head, head_key
    from medmeta.transductive import create_refiner

    previous = previous or {}
    entry = {**previous, "options": dict(previous.get("options", {})), "calibration": dict(previous.get("calibration", {})),
             "tuning": dict(previous.get("tuning", {}))}
    for name, transductive in names:
        if name == "finetune" and tuning_episodes(cfg) > 0:
            from medmeta.training.head_tuning import tune_finetune, tuning_sampler

            head, entry["tuning"][name] = tune_finetune(
                learner, normaliser, store, tuning_sampler(calibration_sampler), tuning_episodes(cfg), device, quiet
            )
        else:
            head = create_head(name)
        refiner = create_refiner(transductive) if transductive else None
        learner_with_head = adapting_learner(learner, head, normaliser, refiner)
        record = fit_calibration(learner_with_head, store, calibration_sampler, val_sampler, cfg, device, quiet, other_shots=other_shots)
        entry["options"][name] = head.hparams()
        entry["calibration"][head_key(name, transductive)] = sidecar_entry(record)
    scores = {name: value for name, value in head_scores(entry, method_record).items() if "+" not in name}
    n_cases = cfg.calibration_episodes * calibration_sampler.way * calibration_sampler.query
    accuracy = {name: a for name, (a, _) in scores.items()}
    entry["default"] = choose_head(accuracy, n_cases, {name: e for name, (_, e) in scores.items()})
    entry["chosen_by"] = (f"accuracy on the calibration episodes (val classes, apart from model selection, {n_cases} cases): "
                          f"among the heads within one standard error of the best, the lowest ECE on the held-out val "
                          f"episodes (within {ECE_MARGIN}), then the cheapest")
    return entry


#: The finetune head's tuning episodes when ``tuning_episodes`` is not set (at most ``val_episodes``).
DEFAULT_TUNING_EPISODES = 50


def tuning_episodes(cfg: TrainConfig) -> int:
    """The val episodes that tune the finetune head: ``cfg.tuning_episodes``, or by default
    :data:`DEFAULT_TUNING_EPISODES` capped by ``cfg.val_episodes`` (a short run tunes briefly)."""
    if cfg.tuning_episodes is not None:
        return int(cfg.tuning_episodes)
    if cfg.val_episodes is None:  # a config not yet resolved for its protocol
        return DEFAULT_TUNING_EPISODES
    return min(DEFAULT_TUNING_EPISODES, int(cfg.val_episodes))


#: Heads from the cheapest adaptation to the costliest: among heads equally good within noise,
#: the cheaper one is the default.
HEAD_COST_ORDER = ("method", "prototype", "logistic", "finetune")


#: Held-out ECEs closer than this count as equal when the default head is chosen: about one
#: standard error of a 15-bin ECE on a few thousand val cases.
ECE_MARGIN = 0.005


def choose_head(accuracy: dict[str, float | None], n_cases: int | None = None, ece: dict[str, float | None] | None = None) -> str:
    """The default head from its ``accuracy`` on the calibration episodes (None or NaN counts as
    unknown, never chosen) and, when given, its ``ece`` on the held-out val episodes after
    temperature scaling.

    With ``n_cases`` (the query cases scored), the one-standard-error rule (Breiman et al.
    1984): the heads whose accuracy is within one binomial standard error,
    ``sqrt(p (1 - p) / n_cases)`` at the best accuracy ``p``, of the best are equally accurate;
    without it only the most accurate are. Among those, the best calibrated (lowest ``ece``;
    within :data:`ECE_MARGIN` of it counts as equal, an unknown ECE as the worst), and of these
    the cheapest (:data:`HEAD_COST_ORDER`): a difference smaller than the noise of the
    calibration episodes does not buy a costlier head (the fine-tuning head costs a training run
    per fit), and at equal accuracy the head whose probabilities are better calibrated gives
    smaller, honest prediction sets."""
    rank = {name: i for i, name in enumerate(HEAD_COST_ORDER)}
    known = [(name, v) for name, v in accuracy.items() if v is not None and math.isfinite(v)]
    if not known:
        return "method"
    known.sort(key=lambda item: rank.get(item[0], len(rank)))
    best = max(v for _, v in known)
    margin = 1e-12 if not n_cases else math.sqrt(max(best * (1 - best), 0.0) / n_cases) + 1e-12
    equal = [name for name, v in known if v >= best - margin]
    if not ece:
        return equal[0]
    errors = {name: ece.get(name) for name in equal}
    errors = {name: (e if e is not None and math.isfinite(e) else math.inf) for name, e in errors.items()}
    lowest = min(errors.values())
    return next(name for name in equal if errors[name] <= lowest + ECE_MARGIN)


def head_scores(heads: dict[str, Any], method_record: "CalibrationRecord") -> dict[str, tuple[float | None, float | None]]:
    """``{head key: (accuracy on the calibration episodes, ECE on the held-out val episodes)}``
    for the method's own head (``method_record``) and every head calibrated in the sidecar's
    ``heads`` entry, transductive variants included (their keys hold a ``+``)."""
    scores = {"method": (method_record.accuracy_fit_episodes, method_record.ece_after_val)}
    scores.update({key: (data.get("accuracy_fit_episodes"), data.get("ece_after_val")) for key, data in heads["calibration"].items()})
    return scores


def print_heads(heads: dict[str, Any], method_record: "CalibrationRecord") -> None:
    """One line: each head's accuracy on the calibration episodes, its ECE on the held-out val
    episodes, and the default chosen."""
    shown = ", ".join(f"{name} {_fmt(accuracy)} (ECE {_fmt(ece)})" for name, (accuracy, ece) in head_scores(heads, method_record).items())
    console.print(
        f"Heads (accuracy on calibration episodes, ECE on held-out val episodes): {shown}; default head: {heads['default']}",
        highlight=False,
    )


def print_calibration(record: "CalibrationRecord") -> None:
    """One paragraph on the fitted calibration, for the console."""
    conformal, evidence, referral = record.conformal, record.conformal_evidence, record.referral
    console.print(
        f"Temperature {record.temperature:.3f}: ECE ({record.n_bins} bins, held-out val episodes) "
        f"{_fmt(record.ece_before_val)} -> {_fmt(record.ece_after_val)}"
        + "".join(f"; {shot}-shot temperature {t:.3f}" for shot, t in sorted(record.shot_temperatures.items())),
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
    heads: list[str] | None = None,
) -> "CalibrationRecord":
    """Refit the calibration of an existing checkpoint on its protocol's val classes (e.g. for
    another coverage or shot), for the method's own head and every embedding head
    (:func:`calibrate_heads`, which chooses the default head again), and rewrite its sidecar;
    the weights are untouched. A checkpoint without an embedding normaliser gets one. Episodes use
    the training run's seeds, so the result equals what training would have stored.

    ``heads`` (``HEAD`` or ``HEAD+REFINER`` specs, e.g. ``["prototype+alpha_tim"]``) refits only
    those, keeping every other stored calibration as it is: the way to calibrate a head or a
    transductive variant that training does not (:func:`parse_head_specs`). ``method`` names the
    method's own head; without it the stored method calibration is kept, so ``method_options``
    then needs ``method`` among ``heads``.

    ``method_options`` changes method hyperparameters that do not touch the weights before the
    refit (e.g. ``{"distance": "euclidean"}`` for ProtoNet: same predictions, other
    probabilities); the sidecar's method record is rewritten with them and the calibration
    record lists them under ``method_options``. The run folder is locked meanwhile
    (:func:`medmeta.output_folder.output_lock`)."""
    from medmeta.output_folder import output_lock

    folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    with output_lock(folder):  # not while a training or another calibration writes the run folder
        return _recalibrate(checkpoint, shot, coverage, conformal_score, class_conditional, refer_share,
                            calibration_episodes, device, quiet, method_options, heads)


def parse_head_specs(specs: list[str]) -> tuple[bool, tuple[tuple[str, str | None], ...]]:
    """``(method head named, ((head, refiner or None), ...))`` from ``HEAD`` or ``HEAD+REFINER``
    specs such as ``["method", "prototype+alpha_tim"]``, in order and without repeats; an unknown
    head or refiner, or a refiner on the method's own head, is a :class:`ConfigError`."""
    from medmeta.heads import METHOD_HEAD, list_heads
    from medmeta.training.config import ConfigError
    from medmeta.transductive import REFINERS

    refiners = [name for name in REFINERS if name != "inductive"]
    with_method, names = False, []
    for spec in specs:
        head, _, refiner = str(spec).partition("+")
        if head not in list_heads():
            raise ConfigError(f"unknown head {head!r} in {spec!r}; choose from {', '.join(list_heads())}", "head")
        if refiner and refiner not in refiners:
            raise ConfigError(f"unknown transductive refiner {refiner!r} in {spec!r}; choose from {', '.join(refiners)}", "head")
        if head == METHOD_HEAD:
            if refiner:
                raise ConfigError(f"{spec!r}: transductive refinement works on embedding heads, not the method's own", "head")
            with_method = True
        elif (head, refiner or None) not in names:
            names.append((head, refiner or None))
    return with_method, tuple(names)


def _recalibrate(checkpoint, shot, coverage, conformal_score, class_conditional, refer_share,
                 calibration_episodes, device, quiet, method_options, head_specs) -> "CalibrationRecord":
    from medmeta.checkpoint import update_checkpoint_meta
    from medmeta.run import load_run
    from medmeta.training.config import ConfigError

    with_method, names = parse_head_specs(head_specs) if head_specs else (True, TRAINED_HEADS)
    if method_options and not with_method:
        raise ConfigError("--method-option changes the method's own head: add --head method to refit it", "head")
    run = load_run(checkpoint, device, method_options=method_options or None, allow_unfinished=True)  # calibrating finishes it
    overrides = {"coverage": coverage, "conformal_score": conformal_score, "class_conditional": class_conditional,
                 "refer_share": refer_share, "calibration_episodes": calibration_episodes}
    cfg, (way, trained_shot, query) = _stored_settings(run, {k: v for k, v in overrides.items() if v is not None})
    shot = shot or trained_shot
    _check_recalibration(cfg, shot)
    calibration_sampler = run.sampler("val", way, shot, query, cfg.seed + CALIBRATION_SEED_OFFSET)
    val_sampler = run.sampler("val", way, shot, query, cfg.seed + VAL_SEED_OFFSET)
    store = run.store()
    shots = tuple(run.protocol.episodes.shot)
    if with_method or not run.checkpoint.meta.get("calibration"):
        record = fit_calibration(run.learner, store, calibration_sampler, val_sampler, cfg, run.device, quiet, other_shots=shots)
    else:
        record = run.checkpoint.calibration
    if method_options:
        record.method_options = dict(method_options)
    normaliser = run.checkpoint.normaliser or fit_normaliser(run.learner, store, train_records(run.protocol), run.device)
    heads = calibrate_heads(
        run.learner, normaliser, record, store, calibration_sampler, val_sampler, cfg, run.device, quiet,
        names=names, previous=run.checkpoint.heads_record or None, other_shots=shots,
    )
    update_checkpoint_meta(
        run.checkpoint.path, calibration=sidecar_entry(record), method=run.checkpoint.meta["method"],
        embedding_normaliser=normaliser.to_dict(), heads=heads,
    )
    if not quiet:
        print_heads(heads, record)
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

