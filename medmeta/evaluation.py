"""Running a learner over seeded episodes and summarising what it got right, and how sure it was.

Every episode goes through the same :mod:`medmeta.pipeline` steps as ``medmeta adapt``: the
head is fitted to the episode's support and scores its query (:func:`run_episodes`), then the
temperature, set and referral steps turn the logits into calibrated decisions
(:func:`summarize`). Validation during training uses the same two functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmeta.calibration import (
    DEFAULT_CALIBRATION_SOURCE,
    TEMPERATURE_PRIOR_SIGMA,
    ConformalPredictor,
    aurc,
    brier_score,
    distance_flags,
    expected_calibration_error,
    macro_auc,
    maximum_calibration_error,
    mean_confidence_interval,
    negative_log_likelihood,
    per_class_recall,
    risk_at_coverage,
    softmax,
)
from medmeta.data.episodes import EpisodeSampler
from medmeta.data.store import ImageStore
from medmeta.pipeline import Diagnosis, LearnerHead, Logits, PredictionSetStep, ReferralStep, Task, TemperatureStep


@dataclass
class EpisodeOutputs:
    """Per episode: query logits ``(n_query, n_way)``, labels ``(n_query,)``, support distances
    ``(n_query,)`` and the episode's class names (``n_way``; label ``i`` is ``classes[i]``).
    The support labels ``(n_support,)`` (their counts are the episode's shot); with held-out
    support predictions (``run_episodes(..., support_loo=True)``), each support scan's logits
    from the fit without it ``(n_support, n_way)`` (None for an episode with a single scan of
    some class)."""

    logits: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    distances: list[np.ndarray] = field(default_factory=list)
    classes: list[list[str]] = field(default_factory=list)
    support_logits: list[np.ndarray | None] = field(default_factory=list)
    support_labels: list[np.ndarray | None] = field(default_factory=list)

    def append(self, logits: Logits, task: Task) -> None:
        """Add one episode's head output."""
        self.logits.append(logits.query)
        self.labels.append(task.query_labels.numpy())
        self.distances.append(logits.distances)
        self.classes.append(list(task.conditions))
        self.support_logits.append(logits.support_held_out)
        self.support_labels.append(task.support_labels.numpy())

    def episode(self, i: int) -> tuple[Logits, np.ndarray | None]:
        """Episode ``i``'s head output and its support labels (None when not kept)."""
        held_out = self.support_logits[i] if i < len(self.support_logits) else None
        labels = self.support_labels[i] if i < len(self.support_labels) else None
        return Logits(self.logits[i], self.distances[i] if self.distances else np.full(len(self.logits[i]), np.nan), held_out), labels

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.logits), np.concatenate(self.labels)

    def pooled_distances(self) -> np.ndarray:
        """``(n,)`` support distances of all query cases, in :meth:`pooled` order."""
        return np.concatenate(self.distances) if self.distances else np.zeros(0)

    def pooled_class_names(self) -> np.ndarray | None:
        """``(n,)`` true class name of every query case (None when class names were not kept)."""
        if len(self.classes) != len(self.labels):
            return None
        return np.concatenate([np.asarray(names, dtype=object)[lb] for names, lb in zip(self.classes, self.labels)])

    def pooled_predicted_names(self) -> np.ndarray | None:
        """``(n,)`` class name of every query case's top logit (None without class names)."""
        if len(self.classes) != len(self.logits):
            return None
        return np.concatenate([np.asarray(names, dtype=object)[lg.argmax(1)] for names, lg in zip(self.classes, self.logits)])


def episode_task(store: ImageStore, sampler: EpisodeSampler, index: int) -> Task:
    """Episode ``index`` of ``sampler`` as a pipeline :class:`~medmeta.pipeline.Task`."""
    ep = sampler.episode(index)
    return Task(store.stack(ep.support), ep.support_labels, store.stack(ep.query), list(ep.classes), ep.query_labels)


def embedded_task(cache, sampler: EpisodeSampler, index: int) -> Task:
    """Episode ``index`` of ``sampler`` as a :class:`~medmeta.pipeline.Task` whose "images" are
    the scans' embeddings from ``cache`` (an :class:`~medmeta.embedded.EmbeddingCache`)."""
    ep = sampler.episode(index)
    return Task(cache.stack(ep.support), ep.support_labels, cache.stack(ep.query), list(ep.classes), ep.query_labels)


def run_episodes(
    learner,
    store: ImageStore,
    sampler: EpisodeSampler,
    indices: Iterable[int],
    device: torch.device,
    on_episode: Callable[[EpisodeOutputs], None] | None = None,
    support_loo: bool = False,
) -> EpisodeOutputs:
    """Fit the learner's head to every episode in ``indices`` and score its query (evaluation
    mode: no statistics are updated; the learner's training mode is restored afterwards).

    With ``support_loo``, also refit once per support scan without it and keep that scan's
    logits (for calibration on the episode's own support).

    A learner that adapts on embeddings (:func:`medmeta.embedded.adapts_on_embeddings`: ProtoNet,
    the embedding heads) embeds each scan once for all the episodes (an
    :class:`~medmeta.embedded.EmbeddingCache`) and adapts on the embeddings; the others run
    every episode's scans through the backbone."""
    from medmeta.embedded import EmbeddingCache, OnEmbeddings, adapts_on_embeddings

    cache = EmbeddingCache(learner, store, device) if adapts_on_embeddings(learner) else None
    head = LearnerHead(OnEmbeddings(learner) if cache is not None else learner, device, batch_size=None)
    was_training = learner.training
    learner.eval()
    out = EpisodeOutputs()
    try:
        for index in indices:
            task = episode_task(store, sampler, index) if cache is None else embedded_task(cache, sampler, index)
            out.append(head(task, held_out=support_loo), task)
            if on_episode is not None:
                on_episode(out)
    finally:
        learner.train(was_training)
    return out


@dataclass
class EpisodeSummary:
    """What :func:`summarize` measures over a set of episodes (None: not computable here).

    Accuracy is the mean over episodes with its 95% CI; macro AUC the mean over episodes; ECE,
    MCE, NLL and Brier are pooled over all cases, before and after calibration; ``aurc`` is of
    the calibrated confidence. Sets and referral entries need a conformal predictor and/or a
    distance threshold."""

    episodes: int
    n_cases: int
    accuracy: float
    accuracy_ci95: float
    macro_auc: float
    temperature: float
    temperature_source: str
    support_temperature_mean: float | None
    temperature_prior_sigma: float | None
    ece_before: float
    ece_after: float
    mce_before: float
    mce_after: float
    nll_before: float
    nll_after: float
    brier_before: float
    brier_after: float
    aurc: float
    per_class_recall: dict[str, float] | None
    conformal_source: str | None = None
    support_threshold_mean: float | None = None
    coverage_target: float | None = None
    coverage: float | None = None
    mean_set_size: float | None = None
    empty_set_rate: float | None = None
    singleton_rate: float | None = None
    per_class_coverage: dict[str, float] | None = None
    referral_rate: float | None = None
    referral_rate_set: float | None = None
    referral_rate_distance: float | None = None
    accuracy_not_referred: float | None = None
    n_not_referred: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _steps(temperature, sets, referral) -> tuple[TemperatureStep, PredictionSetStep, ReferralStep]:
    """Steps from their shorthands: a float temperature (the validation one), a fitted
    predictor (its validation threshold) or None (no sets), a float distance threshold or None."""
    temperature = temperature if isinstance(temperature, TemperatureStep) else TemperatureStep(temperature)
    sets = sets if isinstance(sets, PredictionSetStep) else PredictionSetStep(sets)
    referral = referral if isinstance(referral, ReferralStep) else ReferralStep(referral)
    return temperature, sets, referral


def diagnose(
    outputs: EpisodeOutputs,
    temperature: TemperatureStep | float = 1.0,
    sets: PredictionSetStep | ConformalPredictor | None = None,
    referral: ReferralStep | float | None = None,
) -> list[Diagnosis]:
    """Each episode's :class:`~medmeta.pipeline.Diagnosis`: the calibration, set and referral
    steps applied to its head output (shorthands as in :func:`summarize`)."""
    temperature, sets, referral = _steps(temperature, sets, referral)
    return [_diagnose(outputs, i, temperature, sets, referral) for i in range(len(outputs.logits))]


def summarize(
    outputs: EpisodeOutputs,
    temperature: TemperatureStep | float = 1.0,
    sets: PredictionSetStep | ConformalPredictor | None = None,
    referral: ReferralStep | float | None = None,
    n_bins: int = 15,
    diagnoses: list[Diagnosis] | None = None,
) -> EpisodeSummary:
    """Run the calibration, set and referral steps on every episode of ``outputs`` and measure.

    ``temperature``: a :class:`TemperatureStep` (a float means that validation temperature);
    ``sets``: a :class:`PredictionSetStep` (a fitted predictor means its validation threshold;
    None: no sets); ``referral``: a :class:`ReferralStep` (a float means that distance
    threshold; None: no distance referral). Steps that need held-out support logits fall back
    when ``outputs`` has none (the temperature to the validation one, the sets to probability-mass
    sets; the summary's sources say what was used). ``diagnoses``: the result of :func:`diagnose` with the same steps, when the caller
    has it already.
    """
    temperature, sets, referral = _steps(temperature, sets, referral)
    if diagnoses is None:
        diagnoses = diagnose(outputs, temperature, sets, referral)
    logits, labels = outputs.pooled()
    after = np.concatenate([d.probabilities.query for d in diagnoses])
    summary = EpisodeSummary(
        **_accuracy_stats(outputs),
        **_calibration_stats(softmax(logits), after, labels, diagnoses, temperature, n_bins),
        per_class_recall=_recall(outputs),
    )
    pooled_sets = None
    if sets.conformal is not None:
        pooled_sets = np.concatenate([d.sets.sets for d in diagnoses])
        # one source for the whole evaluation, or e.g. "mass+support" when episodes differed
        summary.conformal_source = "+".join(sorted({d.sets.source for d in diagnoses}))
        if summary.conformal_source == "support":
            summary.support_threshold_mean = float(np.mean([d.sets.predictor.threshold_ for d in diagnoses]))
        _set_stats(summary, pooled_sets, labels, outputs.pooled_class_names(), sets.conformal.coverage)
    if pooled_sets is not None or referral.distance_threshold is not None:
        refer = np.concatenate([d.referral.refer for d in diagnoses])
        _referral_stats(summary, after, labels, refer, outputs.pooled_distances(), pooled_sets, referral.distance_threshold)
    return summary


def _diagnose(outputs, i, temperature, sets, referral) -> Diagnosis:
    logits, support_labels = outputs.episode(i)
    probs = temperature(logits, support_labels)
    chosen = sets(probs, support_labels)
    classes = outputs.classes[i] if i < len(outputs.classes) else [str(c) for c in range(logits.query.shape[1])]
    return Diagnosis(list(classes), logits, probs, chosen, referral(chosen.sets, logits.distances, classes))


def _accuracy_stats(outputs: EpisodeOutputs) -> dict[str, Any]:
    accs = np.array([(lg.argmax(1) == lb).mean() for lg, lb in zip(outputs.logits, outputs.labels)])
    aucs = np.array([macro_auc(softmax(lg), lb) for lg, lb in zip(outputs.logits, outputs.labels)])
    mean, ci = mean_confidence_interval(accs)
    return {
        "episodes": len(accs),
        "n_cases": int(sum(len(lb) for lb in outputs.labels)),
        "accuracy": mean,
        "accuracy_ci95": ci,
        "macro_auc": float(np.nanmean(aucs)) if len(aucs) and not np.isnan(aucs).all() else float("nan"),
    }


def _calibration_stats(before, after, labels, diagnoses, temperature: TemperatureStep, n_bins: int) -> dict[str, Any]:
    support = bool(diagnoses) and all(d.probabilities.source == "support" for d in diagnoses)
    temperatures = np.array([d.probabilities.temperature for d in diagnoses])
    return {
        "temperature": float(temperature.temperature),
        "temperature_source": "support" if support else "val",
        "support_temperature_mean": float(np.exp(np.log(temperatures).mean())) if support else None,
        "temperature_prior_sigma": temperature.prior_sigma if support else None,
        "ece_before": expected_calibration_error(before, labels, n_bins),
        "ece_after": expected_calibration_error(after, labels, n_bins),
        "mce_before": maximum_calibration_error(before, labels, n_bins),
        "mce_after": maximum_calibration_error(after, labels, n_bins),
        "nll_before": negative_log_likelihood(before, labels),
        "nll_after": negative_log_likelihood(after, labels),
        "brier_before": brier_score(before, labels),
        "brier_after": brier_score(after, labels),
        "aurc": aurc(after.max(1), after.argmax(1) == labels),
    }


def _recall(outputs: EpisodeOutputs) -> dict[str, float] | None:
    true_names, predicted_names = outputs.pooled_class_names(), outputs.pooled_predicted_names()
    return per_class_recall(true_names, predicted_names) if true_names is not None else None


def _set_stats(summary: EpisodeSummary, sets: np.ndarray, labels: np.ndarray, names: np.ndarray | None, target: float) -> None:
    covered = sets[np.arange(len(labels)), labels]
    size = sets.sum(axis=1)
    summary.coverage_target = float(target)
    summary.coverage = float(covered.mean())
    summary.mean_set_size = float(size.mean())
    summary.empty_set_rate = float((size == 0).mean())
    summary.singleton_rate = float((size == 1).mean())
    if names is not None:
        summary.per_class_coverage = {str(c): float(covered[names == c].mean()) for c in sorted(set(names.tolist()), key=str)}


def _referral_stats(summary, probs, labels, refer, distances, sets, distance_threshold) -> None:
    kept = ~refer
    correct = probs.argmax(1) == labels
    summary.referral_rate = float(refer.mean())
    summary.referral_rate_set = float((sets.sum(axis=1) != 1).mean()) if sets is not None else None
    if distance_threshold is not None:
        summary.referral_rate_distance = float(distance_flags(distances, distance_threshold).mean())
    summary.accuracy_not_referred = float(correct[kept].mean()) if kept.any() else float("nan")
    summary.n_not_referred = int(kept.sum())


# Coverage levels at which evaluation JSON records the risk-coverage curve.
RISK_COVERAGE_LEVELS = np.round(np.arange(1, 101) / 100, 2)


@dataclass
class EvaluationSettings:
    """What to measure a checkpoint on. ``None`` episode settings come from the protocol:
    ``way`` and ``query`` as written, ``shot`` its smallest, ``episodes`` its ``test_episodes``.
    The episodes depend only on the protocol, the shape and ``seed``, never on the model, so
    methods are compared on identical episodes. ``*_source="support"`` calibrates on each
    episode's own support (two or more shots; see :mod:`medmeta.pipeline`)."""

    protocol: str | Path | None = None
    way: int | None = None
    shot: int | None = None
    query: int | None = None
    episodes: int | None = None
    seed: int = 0
    conformal_source: str = DEFAULT_CALIBRATION_SOURCE
    temperature_source: str = DEFAULT_CALIBRATION_SOURCE
    prior_sigma: float = TEMPERATURE_PRIOR_SIGMA
    head: str | None = None
    transductive: str | None = None

    def resolved(self, protocol) -> "EvaluationSettings":
        """A copy with every ``None`` filled in from ``protocol``'s episode settings."""
        ep = protocol.episodes
        return EvaluationSettings(
            self.protocol, self.way or ep.way, self.shot or min(ep.shot), self.query or ep.query,
            self.episodes or ep.test_episodes, self.seed, self.conformal_source, self.temperature_source, self.prior_sigma,
            self.head, self.transductive,
        )

    @property
    def tag(self) -> str:
        """``<way>way_<shot>shot``, then ``_<head>`` for a head other than the method's own
        (``_<head>+<refiner>`` when refined transductively)."""
        tag = f"{self.way}way_{self.shot}shot"
        if self.head in (None, "method") and not self.transductive:
            return tag
        return f"{tag}_{self.head or 'default'}" + (f"+{self.transductive}" if self.transductive else "")


@dataclass
class EvaluationResult:
    """A checkpoint measured on a protocol's test classes. ``to_dict()`` is the evaluation JSON.

    ``probabilities_before``/``_after`` ``(n, n_way)`` and ``labels`` ``(n,)`` are the pooled
    cases, kept for the figures (:mod:`medmeta.reports.evaluation`); they are not in the JSON."""

    checkpoint: str
    checkpoint_sha256: str
    method: str
    backbone: str
    protocol: str
    test_classes: list[str]
    settings: EvaluationSettings
    summary: EpisodeSummary
    conformal: dict[str, Any] | None
    distance_threshold: float | None
    risk_coverage: dict[str, list[float]]
    notes: list[str]
    warnings: list[str] = field(default_factory=list)
    figures: dict[str, str] | None = None
    probabilities_before: np.ndarray | None = field(default=None, repr=False)
    probabilities_after: np.ndarray | None = field(default=None, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)

    @property
    def tag(self) -> str:
        """File-name tag: ``<way>way_<shot>shot``, then ``_tsupport``/``_support`` for support
        calibration, ``_mass`` for probability-mass sets."""
        tag = self.settings.tag
        if self.summary.temperature_source == "support":
            tag += "_tsupport"
        if self.summary.conformal_source in ("support", "mass"):
            tag += "_" + self.summary.conformal_source
        return tag

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        out = {
            "checkpoint": self.checkpoint, "checkpoint_sha256": self.checkpoint_sha256, "method": self.method,
            "backbone": self.backbone, "protocol": self.protocol, "test_classes": self.test_classes,
            "way": s.way, "shot": s.shot, "query": s.query, "seed": s.seed, "head": s.head or "method",
            "transductive": s.transductive,
            **self.summary.to_dict(),
            "conformal": self.conformal, "distance_threshold": self.distance_threshold,
            "risk_coverage": self.risk_coverage, "notes": self.notes, "warnings": self.warnings,
        }
        if self.figures is not None:
            out["figures"] = self.figures
        return out


def evaluate_checkpoint(
    checkpoint,
    settings: EvaluationSettings | None = None,
    device: str = "auto",
    out_dir: str | Path | None = None,
    quiet: bool = False,
    allow_unfinished: bool = False,
) -> EvaluationResult:
    """Measure a checkpoint (a path, or a :class:`~medmeta.run.LoadedRun`) on seeded episodes
    of its protocol's test classes (``settings``; default: the protocol's shape), through the
    same pipeline as ``adapt``, with the calibration it stores. With ``out_dir`` the results
    JSON, the reliability and risk-coverage figures and the episodes' file lists are written
    there (:func:`medmeta.reports.write_evaluation`): the folder is checked before any work and
    locked for the whole evaluation (:func:`medmeta.output_folder.output_lock`); results of other
    settings already there are kept."""
    from medmeta.io import check_output_folder
    from medmeta.output_folder import output_lock

    if out_dir is None:
        return _evaluate(checkpoint, settings, device, None, quiet, allow_unfinished)
    check_output_folder(out_dir, overwrite=True)  # before any work: not a file, parent writable
    with output_lock(out_dir):
        return _evaluate(checkpoint, settings, device, out_dir, quiet, allow_unfinished)


def _evaluate(checkpoint, settings, device, out_dir, quiet, allow_unfinished) -> EvaluationResult:
    from medmeta.pipeline import AdaptationPipeline
    from medmeta.run import as_run

    settings = settings or EvaluationSettings()
    run = as_run(checkpoint, device, protocol=settings.protocol, allow_unfinished=allow_unfinished)
    settings = settings.resolved(run.protocol)
    store = run.store()
    unreadable = run.drop_unreadable("test", store)
    sampler = run.sampler("test", settings.way, settings.shot, settings.query, settings.seed)
    pipeline = AdaptationPipeline.from_run(
        run, settings.temperature_source, settings.conformal_source, settings.prior_sigma, batch_size=None, head=settings.head,
        transductive=settings.transductive,
    )
    settings.head = pipeline.head_name
    outputs = _run_with_progress(run, pipeline.head.learner, store, sampler, settings, pipeline.needs_held_out, quiet)
    diagnoses = diagnose(outputs, pipeline.temperature, pipeline.sets, pipeline.referral)
    summary = summarize(outputs, pipeline.temperature, pipeline.sets, pipeline.referral, diagnoses=diagnoses)
    logits, labels = outputs.pooled()
    after = np.concatenate([d.probabilities.query for d in diagnoses])
    confidence, correct = after.max(1), after.argmax(1) == labels
    calibration = pipeline.calibration
    conformal = calibration.conformal
    result = EvaluationResult(
        checkpoint=str(run.checkpoint.path), checkpoint_sha256=run.checkpoint.sha256, method=run.method,
        backbone=run.backbone, protocol=run.protocol.name, test_classes=run.protocol.classes["test"],
        settings=settings, summary=summary, conformal=conformal.to_dict() if conformal is not None else None,
        distance_threshold=calibration.distance_threshold,
        risk_coverage={
            "coverage": RISK_COVERAGE_LEVELS.tolist(),
            "risk": risk_at_coverage(confidence, correct, RISK_COVERAGE_LEVELS).tolist(),
        },
        notes=calibration.notes(run.method) + _fallback_notes(pipeline, summary, settings.shot) + _unreadable_notes(unreadable),
        probabilities_before=softmax(logits), probabilities_after=after, labels=labels,
    )
    result.warnings = evaluation_warnings(calibration, summary, settings.shot)
    if out_dir is not None:
        from medmeta.reports.evaluation import write_evaluation

        sampler.save_manifest(Path(out_dir) / f"episodes_{settings.tag}_seed{settings.seed}.csv", range(settings.episodes))
        write_evaluation(result, out_dir)
    return result


def _unreadable_notes(unreadable: list[tuple[str, str]]) -> list[str]:
    if not unreadable:
        return []
    key, reason = unreadable[0]
    return [f"{len(unreadable)} unreadable test scan(s) left out of the episodes, e.g. {key}: {reason}"]


def _run_with_progress(run, learner, store, sampler, settings: EvaluationSettings, held_out: bool, quiet: bool) -> EpisodeOutputs:
    from medmeta.progress import make_progress

    with make_progress(disable=quiet) as progress:
        task = progress.add_task("Evaluating", total=settings.episodes, status="")

        def tick(out: EpisodeOutputs) -> None:
            accs = [(lg.argmax(1) == lb).mean() for lg, lb in zip(out.logits, out.labels)]
            progress.update(task, advance=1, status=f"acc {np.mean(accs):.3f}")

        return run_episodes(learner, store, sampler, range(settings.episodes), run.device, tick, held_out)


def _fallback_notes(pipeline, summary: EpisodeSummary, shot: int) -> list[str]:
    notes = []
    if pipeline.sets.needs_held_out and summary.conformal_source != "support":
        notes.append(
            f"Support-calibrated sets need two support scans per class ({shot}-shot given): the sets hold the most "
            "probable classes up to the target share of the calibrated probability (not calibrated by any threshold)."
        )
    if pipeline.temperature.needs_held_out and summary.temperature_source != "support":
        notes.append(f"Support-updated temperatures need two support scans per class ({shot}-shot given): the validation temperature was used.")
    return notes


def evaluation_warnings(calibration, summary: EpisodeSummary, shot: int) -> list[str]:
    """What a reader of the figures must not miss: probabilities and sets calibrated for another
    shot than the one measured, and coverage below its target by more than sampling noise
    (2.58 binomial standard errors over the pooled cases, a 99% band)."""
    warnings = []
    if (calibration.fitted and calibration.shot is not None and shot not in calibration.temperatures_by_shot()
            and summary.temperature_source == "val"):
        warnings.append(
            f"the checkpoint was calibrated on {calibration.shot}-shot episodes but is measured at {shot}-shot; "
            f"recalibrate with `medmeta calibrate --shot {shot}` for calibrated figures"
        )
    if summary.coverage is not None and summary.coverage_target is not None and summary.n_cases:
        target = summary.coverage_target
        band = 2.58 * (target * (1 - target) / summary.n_cases) ** 0.5
        if summary.coverage < target - band:
            why = (
                "the probabilities are overconfident on these conditions (the sets hold the most probable classes up "
                "to the target mass, and that mass overstates their chance)"
                if summary.conformal_source == "mass"
                else "these conditions are not exchangeable with those the sets were calibrated on; consider "
                "--conformal-source support"
            )
            warnings.append(
                f"prediction sets cover {100 * summary.coverage:.1f}% of cases, below the {100 * target:.0f}% target "
                f"(more than sampling noise): {why}"
            )
    return warnings
