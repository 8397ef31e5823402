"""Calibration metrics exact on hand-computed inputs; temperature scaling recovers a known T."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medmeta.calibration import (
    TemperatureScaler,
    brier_score,
    expected_calibration_error,
    macro_auc,
    mean_confidence_interval,
    negative_log_likelihood,
    softmax,
)


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 1])
    # 15 bins: 0.9 -> bin 13, 0.8 -> bin 11, 0.7 -> bin 10, 0.55 -> bin 8; each bin holds one case
    # |acc - conf|: |1-.9|=.1, |0-.8|=.8, |1-.7|=.3, |1-.55|=.45 -> mean 0.4125
    assert expected_calibration_error(probs, labels, n_bins=15) == pytest.approx(0.4125)
    # one bin: |mean acc - mean conf| = |0.75 - 0.7375|
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.0125)


def test_nll_and_brier_by_hand():
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    labels = np.array([0, 1])
    assert negative_log_likelihood(probs, labels) == pytest.approx(-(math.log(0.5) + math.log(0.8)) / 2)
    # (0.25 + 0.0625 + 0.0625) and (0.01 + 0.04 + 0.01)
    assert brier_score(probs, labels) == pytest.approx((0.375 + 0.06) / 2)


def test_confidence_interval_and_auc():
    mean, half = mean_confidence_interval(np.array([0.5, 0.7, 0.6, 0.8]))
    assert mean == pytest.approx(0.65)
    assert half == pytest.approx(1.96 * np.std([0.5, 0.7, 0.6, 0.8], ddof=1) / 2)
    probs = softmax(np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]]))
    assert macro_auc(probs, np.array([0, 1, 2, 0])) == pytest.approx(1.0)


@pytest.mark.parametrize("true_t", [0.5, 2.0, 8.0])
def test_temperature_fit_recovers_a_known_temperature(true_t):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(20000, 5))
    probs = softmax(logits / true_t)
    labels = (probs.cumsum(1) > rng.random((len(probs), 1))).argmax(1)
    scaler = TemperatureScaler().fit(logits, labels)
    assert scaler is not None and scaler.temperature_ == pytest.approx(true_t, rel=0.05)
    assert negative_log_likelihood(scaler.predict_proba(logits), labels) <= negative_log_likelihood(softmax(logits), labels)


def test_temperature_fit_lowers_ece_of_overconfident_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(5000, 3))
    labels = (softmax(logits).cumsum(1) > rng.random((5000, 1))).argmax(1)
    sharp = logits * 5
    scaler = TemperatureScaler().fit(sharp, labels)
    assert expected_calibration_error(scaler.predict_proba(sharp), labels) < expected_calibration_error(softmax(sharp), labels) / 3
