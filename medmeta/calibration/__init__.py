"""Calibration: temperature scaling and calibration metrics."""

from medmeta.calibration.metrics import (
    brier_score,
    expected_calibration_error,
    macro_auc,
    mean_confidence_interval,
    negative_log_likelihood,
    softmax,
)
from medmeta.calibration.temperature import TemperatureScaler

__all__ = [
    "TemperatureScaler",
    "brier_score",
    "expected_calibration_error",
    "macro_auc",
    "mean_confidence_interval",
    "negative_log_likelihood",
    "softmax",
]
