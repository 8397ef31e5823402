"""Calibration: temperature scaling, conformal prediction sets, referral and their metrics."""

from medmeta.calibration.conformal import ConformalPredictor, conformal_quantile
from medmeta.calibration.metrics import (
    aurc,
    brier_score,
    expected_calibration_error,
    macro_auc,
    maximum_calibration_error,
    mean_confidence_interval,
    negative_log_likelihood,
    per_class_recall,
    reliability_bins,
    risk_at_coverage,
    risk_coverage_curve,
    softmax,
)
from medmeta.calibration.referral import DistanceThreshold, distance_flags, referral
from medmeta.calibration.temperature import TemperatureScaler

__all__ = [
    "ConformalPredictor",
    "DistanceThreshold",
    "TemperatureScaler",
    "aurc",
    "brier_score",
    "conformal_quantile",
    "distance_flags",
    "expected_calibration_error",
    "macro_auc",
    "maximum_calibration_error",
    "mean_confidence_interval",
    "negative_log_likelihood",
    "per_class_recall",
    "referral",
    "reliability_bins",
    "risk_at_coverage",
    "risk_coverage_curve",
    "softmax",
]
