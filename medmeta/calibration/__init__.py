"""Calibration: temperature scaling, conformal prediction sets, referral and their metrics."""

from medmeta.calibration.conformal import CONFORMAL_SOURCES, DEFAULT_CALIBRATION_SOURCE, ConformalPredictor, check_conformal_source, conformal_quantile, episode_conformal
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
from medmeta.calibration.mass_sets import ProbabilityMassSets
from medmeta.calibration.referral import DistanceThreshold, distance_flags, referral
from medmeta.calibration.record import CALIBRATION_SCHEMA_VERSION, CalibrationRecord, ReferralRecord
from medmeta.calibration.temperature import TEMPERATURE_PRIOR_SIGMA, TEMPERATURE_SOURCES, SupportTemperature, TemperatureScaler, check_temperature_source

__all__ = [
    "CALIBRATION_SCHEMA_VERSION",
    "DEFAULT_CALIBRATION_SOURCE",
    "CalibrationRecord",
    "ReferralRecord",
    "CONFORMAL_SOURCES",
    "DEFAULT_CALIBRATION_SOURCE",
    "ConformalPredictor",
    "DistanceThreshold",
    "ProbabilityMassSets",
    "SupportTemperature",
    "TEMPERATURE_PRIOR_SIGMA",
    "TEMPERATURE_SOURCES",
    "TemperatureScaler",
    "aurc",
    "brier_score",
    "check_conformal_source",
    "check_temperature_source",
    "conformal_quantile",
    "distance_flags",
    "episode_conformal",
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
