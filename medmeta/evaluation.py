"""Running a learner over seeded episodes and summarising what it got right, and how sure it was."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmeta.calibration import (
    ConformalPredictor,
    TEMPERATURE_PRIOR_SIGMA,
    SupportTemperature,
    aurc,
    brier_score,
    check_conformal_source,
    check_temperature_source,
    distance_flags,
    episode_conformal,
    expected_calibration_error,
    macro_auc,
    maximum_calibration_error,
    mean_confidence_interval,
    negative_log_likelihood,
    per_class_recall,
    referral,
    risk_at_coverage,
    risk_coverage_curve,
    softmax,
)
from medmeta.data.episodes import EpisodeSampler
from medmeta.data.store import ImageStore
from medmeta.io import atomic_write_json, json_safe
from medmeta.leave_one_out import has_two_per_class, leave_one_out
from medmeta.methods.base import MetaLearner


# Coverage levels at which evaluation JSON records the risk-coverage curve.
RISK_COVERAGE_LEVELS = np.round(np.arange(1, 101) / 100, 2)


@dataclass
class EpisodeOutputs:
    """Per episode: query logits ``(n_query, n_way)``, labels ``(n_query,)``, support distances
    ``(n_query,)`` and the episode's class names (``n_way``; label ``i`` is ``classes[i]``).
    With leave-one-out support predictions (``run_episodes(..., support_loo=True)``): each
    support scan's logits from the fit without it ``(n_support, n_way)`` and the support labels
    ``(n_support,)`` (both None for an episode with a single scan of some class)."""

    logits: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    distances: list[np.ndarray] = field(default_factory=list)
    classes: list[list[str]] = field(default_factory=list)
    support_logits: list[np.ndarray | None] = field(default_factory=list)
    support_labels: list[np.ndarray | None] = field(default_factory=list)

    def has_support_loo(self) -> bool:
        """Whether every episode has leave-one-out support predictions."""
        return len(self.support_logits) == len(self.logits) > 0 and all(s is not None for s in self.support_logits)

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


@torch.no_grad()
def run_episodes(
    learner: MetaLearner,
    store: ImageStore,
    sampler: EpisodeSampler,
    indices: Iterable[int],
    device: torch.device,
    on_episode=None,
    support_loo: bool = False,
) -> EpisodeOutputs:
    """Adapt to and predict every episode in ``indices`` (eval mode: no statistics are updated).

    With ``support_loo``, also refit once per support scan without it and keep that scan's
    logits (for prediction sets calibrated on the episode's own support)."""
    was_training = learner.training
    learner.eval()
    out = EpisodeOutputs()
    try:
        for index in indices:
            ep = sampler.episode(index)
            support = store.stack(ep.support).to(device)
            query = store.stack(ep.query).to(device)
            learner.fit_support(support, ep.support_labels.to(device))
            out.logits.append(learner.predict_query(query).double().cpu().numpy())
            out.labels.append(ep.query_labels.numpy())
            out.distances.append(learner.support_distance(query).double().cpu().numpy())
            out.classes.append(list(ep.classes))
            if support_loo and has_two_per_class(ep.support_labels):
                loo = leave_one_out(learner, support, ep.support_labels.to(device), device=device)
                out.support_logits.append(loo.support_logits)
                out.support_labels.append(ep.support_labels.numpy())
            elif support_loo:
                out.support_logits.append(None)
                out.support_labels.append(None)
            if on_episode is not None:
                on_episode(out)
    finally:
        learner.train(was_training)
    return out


@dataclass
class CalibratedEpisodes:
    """Calibrated probabilities of every episode: query ``(n_query, n_way)`` and, with
    leave-one-out support logits, support ``(n_support, n_way)``; ``source`` says where the
    temperature came from (``"val"`` or ``"support"``), ``temperatures`` the one used per
    episode (the posterior summary for ``"support"``) and ``prior_sigma`` the prior spread of
    the support update (None for ``"val"``)."""

    query: list[np.ndarray]
    support: list[np.ndarray | None]
    source: str
    temperatures: np.ndarray
    prior_sigma: float | None = None

    def pooled(self) -> np.ndarray:
        return np.concatenate(self.query)


def calibrate_episodes(
    outputs: EpisodeOutputs,
    temperature: float,
    temperature_source: str = "val",
    prior_sigma: float = TEMPERATURE_PRIOR_SIGMA,
) -> CalibratedEpisodes:
    """Temperature-scaled probabilities of each episode of ``outputs``.

    ``"val"``: ``temperature`` (fitted on validation conditions) everywhere. ``"support"``: in
    each episode, ``temperature`` updated by that episode's leave-one-out support predictions
    (:class:`~medmeta.calibration.SupportTemperature`); needs outputs of
    ``run_episodes(..., support_loo=True)`` with two support scans per class, and falls back to
    ``"val"`` otherwise (``source`` says which was used).
    """
    check_temperature_source(temperature_source)
    loo = outputs.has_support_loo()
    if temperature_source == "support" and loo:
        query, support, used = [], [], []
        for lg, sl, sy in zip(outputs.logits, outputs.support_logits, outputs.support_labels):
            fitted = SupportTemperature(temperature, prior_sigma).fit(sl, sy)
            query.append(fitted.predict_proba(lg))
            support.append(fitted.predict_proba(sl))
            used.append(fitted.temperature_)
        return CalibratedEpisodes(query, support, "support", np.array(used), float(prior_sigma))
    query = [softmax(lg / temperature) for lg in outputs.logits]
    support = [softmax(sl / temperature) if sl is not None else None for sl in outputs.support_logits] if loo else [None] * len(query)
    return CalibratedEpisodes(query, support, "val", np.full(len(query), float(temperature)))


def summarize(
    outputs: EpisodeOutputs,
    temperature: float = 1.0,
    n_bins: int = 15,
    conformal: ConformalPredictor | None = None,
    distance_threshold: float | None = None,
    conformal_source: str = "val",
    temperature_source: str = "val",
    prior_sigma: float = TEMPERATURE_PRIOR_SIGMA,
    calibrated: CalibratedEpisodes | None = None,
) -> dict[str, Any]:
    """Accuracy (mean over episodes, 95% CI), macro AUC (mean over episodes), and pooled ECE,
    MCE, NLL and Brier before and after dividing logits by ``temperature``; the AURC of the
    calibrated confidence; per-class recall by class name (pooled over episodes).

    With a fitted ``conformal`` predictor (applied to the temperature-scaled probabilities):
    empirical coverage, mean set size and their breakdowns. With sets and/or a
    ``distance_threshold``: the referral rate (see :func:`medmeta.calibration.referral`) and
    the accuracy of the cases not referred. Entries that cannot be computed are None.

    ``conformal_source="support"`` replaces ``conformal``'s threshold, in every episode, by one
    fitted on that episode's leave-one-out support predictions (same score and coverage; see
    :func:`medmeta.calibration.episode_conformal`); it needs ``outputs`` from
    ``run_episodes(..., support_loo=True)`` with two support scans per class, and falls back to
    ``conformal`` itself otherwise (``conformal_source`` in the result says which was used).
    ``temperature_source="support"`` updates ``temperature`` by each episode's support (see
    :func:`calibrate_episodes`); "after" then means after that update, and
    ``support_temperature_mean`` is the geometric mean of the episodes' temperatures.
    ``calibrated``: the result of :func:`calibrate_episodes` when the caller already has it
    (then ``temperature_source`` and ``prior_sigma`` are not used again).
    """
    accs = np.array([(lg.argmax(1) == lb).mean() for lg, lb in zip(outputs.logits, outputs.labels)])
    aucs = np.array([macro_auc(softmax(lg), lb) for lg, lb in zip(outputs.logits, outputs.labels)])
    logits, labels = outputs.pooled()
    if calibrated is None:
        calibrated = calibrate_episodes(outputs, temperature, temperature_source, prior_sigma)
    before, after = softmax(logits), calibrated.pooled()
    mean, ci = mean_confidence_interval(accs)
    correct = after.argmax(1) == labels
    stats: dict[str, Any] = {
        "episodes": len(accs),
        "n_cases": len(labels),
        "accuracy": mean,
        "accuracy_ci95": ci,
        "macro_auc": float(np.nanmean(aucs)) if len(aucs) and not np.isnan(aucs).all() else float("nan"),
        "temperature": float(temperature),
        "temperature_source": calibrated.source,
        "support_temperature_mean": float(np.exp(np.log(calibrated.temperatures).mean())) if calibrated.source == "support" else None,
        "temperature_prior_sigma": calibrated.prior_sigma,
        "ece_before": expected_calibration_error(before, labels, n_bins),
        "ece_after": expected_calibration_error(after, labels, n_bins),
        "mce_before": maximum_calibration_error(before, labels, n_bins),
        "mce_after": maximum_calibration_error(after, labels, n_bins),
        "nll_before": negative_log_likelihood(before, labels),
        "nll_after": negative_log_likelihood(after, labels),
        "brier_before": brier_score(before, labels),
        "brier_after": brier_score(after, labels),
        "aurc": aurc(after.max(1), correct),
    }
    true_names, predicted_names = outputs.pooled_class_names(), outputs.pooled_predicted_names()
    stats["per_class_recall"] = per_class_recall(true_names, predicted_names) if true_names is not None else None
    sets, used = None, None
    if conformal is not None:
        if conformal_source == "support" and outputs.has_support_loo():
            parts, thresholds = [], []
            for probs, support_probs, sy in zip(calibrated.query, calibrated.support, outputs.support_labels):
                episode = episode_conformal(conformal, support_probs, sy)
                parts.append(episode.predict_sets(probs))
                thresholds.append(episode.threshold_)
            sets, used = np.concatenate(parts), "support"
            stats["support_threshold_mean"] = float(np.mean(thresholds))
        else:
            sets, used = conformal.predict_sets(after), "val"
    stats["conformal_source"] = used
    stats.update(_set_stats(sets, labels, true_names, conformal.coverage if conformal is not None else None))
    stats.update(_referral_stats(after, labels, outputs.pooled_distances(), sets, distance_threshold))
    return stats


def _set_stats(sets: np.ndarray | None, labels: np.ndarray, names: np.ndarray | None, target: float | None) -> dict[str, Any]:
    keys = ("coverage_target", "coverage", "mean_set_size", "empty_set_rate", "singleton_rate", "per_class_coverage")
    if sets is None:
        return dict.fromkeys(keys)
    covered = sets[np.arange(len(labels)), labels]
    size = sets.sum(axis=1)
    per_class = None
    if names is not None:
        per_class = {str(c): float(covered[names == c].mean()) for c in sorted(set(names.tolist()), key=str)}
    return {
        "coverage_target": float(target),
        "coverage": float(covered.mean()),
        "mean_set_size": float(size.mean()),
        "empty_set_rate": float((size == 0).mean()),
        "singleton_rate": float((size == 1).mean()),
        "per_class_coverage": per_class,
    }


def _referral_stats(
    probs: np.ndarray,
    labels: np.ndarray,
    distances: np.ndarray,
    sets: np.ndarray | None,
    distance_threshold: float | None,
) -> dict[str, Any]:
    keys = ("referral_rate", "referral_rate_set", "referral_rate_distance", "accuracy_not_referred", "n_not_referred")
    if sets is None and distance_threshold is None:
        return dict.fromkeys(keys)
    refer, _ = referral(sets, distances, distance_threshold, [str(i) for i in range(probs.shape[1])])
    kept = ~refer
    correct = probs.argmax(1) == labels
    return {
        "referral_rate": float(refer.mean()),
        "referral_rate_set": float((sets.sum(axis=1) != 1).mean()) if sets is not None else None,
        "referral_rate_distance": float(distance_flags(distances, distance_threshold).mean()) if distance_threshold is not None else None,
        "accuracy_not_referred": float(correct[kept].mean()) if kept.any() else float("nan"),
        "n_not_referred": int(kept.sum()),
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    protocol: str | Path | None = None,
    way: int | None = None,
    shot: int | None = None,
    query: int | None = None,
    episodes: int | None = None,
    seed: int = 0,
    device: str = "auto",
    quiet: bool = False,
    out_dir: str | Path | None = None,
    conformal_source: str = "val",
    temperature_source: str = "val",
    prior_sigma: float = TEMPERATURE_PRIOR_SIGMA,
) -> dict[str, Any]:
    """Measure a checkpoint on seeded episodes of the protocol's test classes.

    The episodes depend only on the protocol, the episode shape and ``seed``, never on the
    model, so methods are compared on identical episodes. The checkpoint's conformal predictor
    and distance threshold (fitted on val-class episodes by ``medmeta train``) give coverage,
    set sizes and referral; checkpoints without them are evaluated without (and ``notes`` says so).
    With ``out_dir``, the results are written there as ``evaluation_<way>way_<shot>shot.json``
    (with the risk-coverage curve at coverage 1%, 2%, ..., 100%), the reliability diagram as
    ``reliability_<way>way_<shot>shot.png``, the risk-coverage curve as
    ``risk_coverage_<way>way_<shot>shot.png`` and the episodes' file lists as
    ``episodes_<way>way_<shot>shot_seed<seed>.csv``. ``conformal_source="support"`` calibrates
    each episode's prediction sets on its own support instead (leave-one-out refits; see
    :func:`summarize`); the file names then end in ``_support``. ``temperature_source="support"``
    updates the checkpoint's temperature by each episode's support (:func:`calibrate_episodes`,
    prior spread ``prior_sigma``); the file names then end in ``_tsupport``. Either needs two
    support scans per class and falls back to the validation calibration (with a note) otherwise.
    """
    from medmeta.checkpoint import build_learner, load_checkpoint
    from medmeta.data.protocol import load_protocol
    from medmeta.data.reading import Preprocessing, ScanReader
    from medmeta.device import resolve_device
    from medmeta.errors import ProtocolError
    from medmeta.progress import make_progress

    check_conformal_source(conformal_source)
    check_temperature_source(temperature_source)
    ckpt = load_checkpoint(checkpoint)
    protocol_path = protocol or ckpt.meta.get("protocol", {}).get("path")
    if not protocol_path:
        raise ProtocolError(f"{ckpt.path}: the checkpoint names no protocol; pass --protocol")
    proto = load_protocol(protocol_path)
    way = way or proto.episodes.way
    shot = shot or min(proto.episodes.shot)
    query = query or proto.episodes.query
    episodes = episodes or proto.episodes.test_episodes
    proto.check_counts(shot, query, splits=("test",))
    learner = build_learner(ckpt)
    torch_device = resolve_device(device)
    learner.to(torch_device)
    store = ImageStore(ScanReader(Preprocessing.from_dict(ckpt.meta["preprocessing"])))
    sampler = EpisodeSampler(proto.split_records("test"), way, shot, query, seed)
    tag = f"{way}way_{shot}shot"
    support_loo = shot >= 2 and ((conformal_source == "support" and ckpt.conformal is not None) or temperature_source == "support")
    if out_dir is not None:
        sampler.save_manifest(Path(out_dir) / f"episodes_{tag}_seed{seed}.csv", range(episodes))
    with make_progress(disable=quiet) as progress:
        task = progress.add_task("Evaluating", total=episodes, status="")

        def tick(out: EpisodeOutputs) -> None:
            accs = [(lg.argmax(1) == lb).mean() for lg, lb in zip(out.logits, out.labels)]
            progress.update(task, advance=1, status=f"acc {np.mean(accs):.3f}")

        outputs = run_episodes(
            learner, store, sampler, range(episodes), torch_device, on_episode=tick, support_loo=support_loo
        )
    conformal, distance_threshold = ckpt.conformal, ckpt.distance_threshold
    notes = ckpt.calibration_notes()
    calibrated = calibrate_episodes(outputs, ckpt.temperature, temperature_source, prior_sigma)
    stats = summarize(
        outputs, temperature=ckpt.temperature, conformal=conformal, distance_threshold=distance_threshold,
        conformal_source=conformal_source, calibrated=calibrated,
    )
    if conformal_source == "support" and stats["conformal_source"] != "support" and conformal is not None:
        notes.append(f"Support-calibrated sets need two support scans per class ({shot}-shot given): the validation threshold was used.")
    if temperature_source == "support" and stats["temperature_source"] != "support":
        notes.append(f"Support-updated temperatures need two support scans per class ({shot}-shot given): the validation temperature was used.")
    if stats["temperature_source"] == "support":
        tag += "_tsupport"
    if stats["conformal_source"] == "support":
        tag += "_support"
    logits, labels = outputs.pooled()
    probs = calibrated.pooled()
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    result = {
        "checkpoint": str(ckpt.path),
        "checkpoint_sha256": ckpt.sha256,
        "method": ckpt.meta["method"]["name"],
        "backbone": ckpt.meta["backbone"]["name"],
        "protocol": proto.name,
        "test_classes": proto.classes["test"],
        "way": way,
        "shot": shot,
        "query": query,
        "seed": seed,
        **stats,
        "conformal": conformal.to_dict() if conformal is not None else None,
        "distance_threshold": distance_threshold,
        "risk_coverage": {
            "coverage": RISK_COVERAGE_LEVELS.tolist(),
            "risk": risk_at_coverage(confidence, correct, RISK_COVERAGE_LEVELS).tolist(),
        },
        "notes": notes,
    }
    if out_dir is not None:
        from medmeta.reports.plots import reliability_diagram, risk_coverage_plot

        out = Path(out_dir)
        title = f"{result['method']} on {proto.name}, {episodes} {way}-way {shot}-shot test episodes"
        reliability_diagram(
            out / f"reliability_{tag}.png",
            {"before": softmax(logits), _after_label(ckpt.temperature, stats): probs},
            labels,
            title=title,
        )
        risk_coverage_plot(out / f"risk_coverage_{tag}.png", *risk_coverage_curve(confidence, correct), stats["aurc"], title=title)
        result["figures"] = {"reliability": f"reliability_{tag}.png", "risk_coverage": f"risk_coverage_{tag}.png"}
        atomic_write_json(out / f"evaluation_{tag}.json", json_safe(result))
    return result


def _after_label(temperature: float, stats: dict[str, Any]) -> str:
    if stats["temperature_source"] == "support":
        return f"after support-updated T (val {temperature:.3g}, mean {stats['support_temperature_mean']:.3g})"
    return f"after temperature scaling (T = {temperature:.3g})"
