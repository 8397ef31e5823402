"""Calibration and accuracy metrics on probabilities ``(n, n_classes)`` and labels ``(n,)``."""

from __future__ import annotations

import math

import numpy as np


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Confidence (the largest probability) binned into ``n_bins`` equal-width bins on (0, 1].

    Returns arrays of length ``n_bins``: ``count`` (cases per bin), ``accuracy`` and
    ``confidence`` (their means over the bin's cases; NaN for an empty bin) and ``edges``
    (``n_bins + 1`` bin edges). A confidence of exactly ``b / n_bins`` falls in bin ``b - 1``.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / count
        mean_confidence = np.bincount(bins, weights=confidence, minlength=n_bins) / count
    return {"count": count, "accuracy": accuracy, "confidence": mean_confidence, "edges": np.linspace(0.0, 1.0, n_bins + 1)}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): confidence binned into ``n_bins`` equal-width bins on (0, 1];
    the bin-size-weighted mean of |accuracy - mean confidence|."""
    bins = reliability_bins(probs, labels, n_bins)
    filled = bins["count"] > 0
    if not filled.any():
        return math.nan
    weights = bins["count"][filled] / bins["count"].sum()
    return float((weights * np.abs(bins["accuracy"][filled] - bins["confidence"][filled])).sum())


def maximum_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """MCE (Naeini et al. 2015): the largest |accuracy - mean confidence| over the non-empty bins
    of :func:`reliability_bins` (the worst-calibrated confidence range, however few cases it holds)."""
    bins = reliability_bins(probs, labels, n_bins)
    filled = bins["count"] > 0
    if not filled.any():
        return math.nan
    return float(np.abs(bins["accuracy"][filled] - bins["confidence"][filled]).max())


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    probs = np.asarray(probs, dtype=np.float64)
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0)).mean())


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over cases of the summed squared error to the one-hot label."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def mean_confidence_interval(values: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()) if len(values) else math.nan, math.nan
    return float(values.mean()), float(z * values.std(ddof=1) / math.sqrt(len(values)))


def macro_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """One-vs-rest macro ROC AUC (NaN when fewer than two classes are present)."""
    from sklearn.metrics import roc_auc_score

    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    if len(present) < probs.shape[1]:
        scores = [roc_auc_score(labels == c, probs[:, c]) for c in present]
        return float(np.mean(scores))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def per_class_recall(true_classes, predicted_classes) -> dict[str, float]:
    """Recall per true class: the share of its cases predicted as that class.

    Args:
        true_classes: ``(n,)`` class of each case (names or ids; pooled over episodes, so use
            names rather than episode-local labels).
        predicted_classes: ``(n,)`` predicted class of each case, same kind as ``true_classes``.

    Returns ``{str(class): recall}`` for every class present in ``true_classes``, sorted by name.
    """
    true_classes, predicted_classes = np.asarray(true_classes), np.asarray(predicted_classes)
    if true_classes.shape != predicted_classes.shape:
        raise ValueError(f"true {true_classes.shape} and predicted {predicted_classes.shape} classes differ in shape")
    return {
        str(c): float((predicted_classes[true_classes == c] == c).mean())
        for c in sorted(np.unique(true_classes), key=str)
    }


def risk_coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selective classification: keep the most confident cases, refer the rest.

    Cases are sorted by decreasing ``confidence`` (ties keep their input order); for
    ``k = 1 .. n`` the coverage is ``k / n`` and the risk is the error rate of the ``k`` most
    confident cases.

    Args:
        confidence: ``(n,)`` e.g. the largest calibrated probability of each case.
        correct: ``(n,)`` bool, whether the case's prediction is right.

    Returns ``(coverage, risk)``, both ``(n,)``.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    errors = ~np.asarray(correct, dtype=bool)
    if confidence.shape != errors.shape or confidence.ndim != 1:
        raise ValueError("confidence and correct must both have shape (n,)")
    order = np.argsort(-confidence, kind="stable")
    kept = np.arange(1, len(order) + 1)
    return kept / len(order), np.cumsum(errors[order]) / kept


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve (Geifman et al. 2019): the mean of the risks of
    :func:`risk_coverage_curve` over ``k = 1 .. n``. Lower is better; a perfect ranking of a
    model with error rate ``e`` still scores above 0 unless ``e = 0``."""
    _, risk = risk_coverage_curve(confidence, correct)
    return float(risk.mean()) if len(risk) else math.nan


def risk_at_coverage(confidence: np.ndarray, correct: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Risk of the ``ceil(level * n)`` most confident cases at each coverage ``level`` in (0, 1]
    (``(n_levels,)``), a compact summary of :func:`risk_coverage_curve` for reports."""
    _, risk = risk_coverage_curve(confidence, correct)
    levels = np.asarray(levels, dtype=np.float64)
    k = np.clip(np.ceil(levels * len(risk) - 1e-9).astype(int), 1, len(risk))
    return risk[k - 1]
