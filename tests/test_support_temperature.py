"""Support-updated temperatures: the posterior over log T by hand, its limits, and its use in
evaluation summaries and ``adapt``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medmeta.calibration import SupportTemperature, TemperatureScaler, expected_calibration_error, softmax
from medmeta.evaluation import EpisodeOutputs, summarize
from medmeta.pipeline import PredictionSetStep, TemperatureStep


def test_posterior_and_probabilities_by_hand_on_a_three_point_grid():
    # grid over log T: log 2 + (-5, 0, 5) * 0.2 = log 2 + (-1, 0, 1)
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 0])  # the second scan is misclassified
    fitted = SupportTemperature(2.0, prior_sigma=0.2, grid_size=3).fit(logits, labels)
    temps = 2.0 * np.exp([-1.0, 0.0, 1.0])
    np.testing.assert_allclose(fitted.log_temperatures_, np.log(temps))
    sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    prior = np.exp(-0.5 * np.array([25.0, 0.0, 25.0]))  # offsets of -5, 0, 5 prior standard deviations
    likelihood = np.array([sigmoid(2.0 / t) * sigmoid(-1.0 / t) for t in temps])
    weights = prior * likelihood / (prior * likelihood).sum()
    np.testing.assert_allclose(fitted.weights_, weights, rtol=1e-12)
    assert fitted.temperature_ == pytest.approx(math.exp((weights * np.log(temps)).sum()))
    case = np.array([[1.0, -1.0]])
    expected = sum(w * sigmoid(2.0 / t) for w, t in zip(weights, temps))
    np.testing.assert_allclose(fitted.predict_proba(case), [[expected, 1 - expected]], rtol=1e-12)


def test_zero_spread_keeps_the_validation_temperature_exactly():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(10, 3))
    fitted = SupportTemperature(1.7, prior_sigma=0.0).fit(logits[:4], np.array([0, 1, 2, 0]))
    assert fitted.temperature_ == pytest.approx(1.7)
    np.testing.assert_allclose(fitted.predict_proba(logits), softmax(logits / 1.7), rtol=1e-12)


@pytest.mark.parametrize("true_t", [0.4, 2.5])
def test_a_wide_prior_and_many_scans_recover_the_maximum_likelihood_temperature(true_t):
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(3000, 4))
    labels = np.array([rng.choice(4, p=p) for p in softmax(logits / true_t)])
    mle = TemperatureScaler().fit(logits, labels).temperature_
    fitted = SupportTemperature(1.0, prior_sigma=10.0, grid_size=2001).fit(logits, labels)
    assert fitted.temperature_ == pytest.approx(mle, rel=0.01)
    assert fitted.temperature_ == pytest.approx(true_t, rel=0.1)


def test_the_support_pulls_the_temperature_its_way_and_more_scans_pull_harder():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=2.0, size=(400, 3))
    sharp = np.array([rng.choice(3, p=p) for p in softmax(logits / 0.5)])  # the new conditions want T = 0.5
    few = SupportTemperature(1.0, 0.5).fit(logits[:15], sharp[:15]).temperature_
    many = SupportTemperature(1.0, 0.5).fit(logits, sharp).temperature_
    assert many < few < 1.0 and many < 0.65  # more evidence moves it further from the prior
    soft = np.array([rng.choice(3, p=p) for p in softmax(logits / 3.0)])
    assert SupportTemperature(1.0, 0.5).fit(logits, soft).temperature_ > 2.0


def test_refusals():
    with pytest.raises(ValueError, match="prior_sigma"):
        SupportTemperature(1.0, -0.1).fit(np.zeros((2, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="prior_temperature"):
        SupportTemperature(0.0).fit(np.zeros((2, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="do not match"):
        SupportTemperature(1.0).fit(np.zeros((2, 2)), np.array([0, 1, 1]))
    with pytest.raises(RuntimeError, match="fit"):
        SupportTemperature(1.0).predict_proba(np.zeros((1, 2)))


def _outputs(with_support: bool = True) -> EpisodeOutputs:
    rng = np.random.default_rng(3)
    logits = [rng.normal(scale=2.0, size=(6, 3)) for _ in range(2)]
    support = [rng.normal(scale=2.0, size=(6, 3)) for _ in range(2)]
    return EpisodeOutputs(
        logits=logits,
        labels=[np.array([0, 1, 2, 0, 1, 2]), np.array([2, 1, 0, 0, 1, 2])],
        distances=[np.zeros(6), np.zeros(6)],
        classes=[["a", "b", "c"], ["c", "b", "a"]],
        support_logits=support if with_support else [],
        support_labels=[np.array([0, 0, 1, 1, 2, 2])] * 2 if with_support else [],
    )


def test_summarize_updates_the_temperature_per_episode():
    outputs = _outputs()
    stats = summarize(outputs, TemperatureStep(1.5, "support", prior_sigma=0.5))
    fits = [SupportTemperature(1.5, 0.5).fit(sl, sy) for sl, sy in zip(outputs.support_logits, outputs.support_labels)]
    probs = np.concatenate([f.predict_proba(lg) for f, lg in zip(fits, outputs.logits)])
    labels = np.concatenate(outputs.labels)
    assert stats.temperature_source == "support" and stats.temperature_prior_sigma == 0.5
    assert stats.ece_after == pytest.approx(expected_calibration_error(probs, labels))
    assert stats.nll_after == pytest.approx(-np.log(probs[np.arange(12), labels]).mean())
    assert stats.support_temperature_mean == pytest.approx(math.sqrt(fits[0].temperature_ * fits[1].temperature_))
    # accuracy and the "before" figures do not depend on the calibration
    val = summarize(outputs, temperature=1.5)
    assert val.temperature_source == "val" and val.support_temperature_mean is None
    assert val.accuracy == stats.accuracy and val.ece_before == stats.ece_before
    assert val.ece_after == pytest.approx(expected_calibration_error(softmax(np.concatenate(outputs.logits) / 1.5), labels))
    # spread 0 is the validation temperature; without leave-one-out logits it falls back to val
    assert summarize(outputs, TemperatureStep(1.5, "support", prior_sigma=0.0)).ece_after == pytest.approx(val.ece_after)
    fallback = summarize(_outputs(with_support=False), TemperatureStep(1.5, "support"))
    assert fallback.temperature_source == "val" and fallback.ece_after == pytest.approx(val.ece_after)
    with pytest.raises(ValueError, match="temperature_source"):
        TemperatureStep(1.5, "test")


def test_support_sets_are_calibrated_on_the_updated_support_probabilities():
    from medmeta.calibration import ConformalPredictor, episode_conformal

    outputs = _outputs()
    template = ConformalPredictor.from_dict({"score": "lac", "coverage": 0.8, "threshold": 0.5})
    stats = summarize(outputs, TemperatureStep(1.5, "support"), PredictionSetStep(template, "support"))
    sizes = []
    for lg, sl, sy in zip(outputs.logits, outputs.support_logits, outputs.support_labels):
        fitted = SupportTemperature(1.5).fit(sl, sy)
        sets = episode_conformal(template, fitted.predict_proba(sl), sy).predict_sets(fitted.predict_proba(lg))
        sizes.append(sets.sum(axis=1))
    assert stats.mean_set_size == pytest.approx(np.concatenate(sizes).mean())


# ---- adapt ---------------------------------------------------------------------------------------
def test_adapt_with_support_updated_temperature(tmp_path):
    from test_conformal_referral import CALIBRATED, SAMPLE_CASES, _checkpoint, sample_support_and_queries

    from medmeta.adaptation import adapt, predict_cases
    from medmeta.checkpoint import build_learner, load_checkpoint
    from medmeta.leave_one_out import leave_one_out

    path = _checkpoint(tmp_path, CALIBRATED)
    result = adapt(path, SAMPLE_CASES, device="cpu", temperature_source="support", prior_sigma=0.5)
    meta = result.metadata
    assert meta["temperature_source"] == "support" and meta["temperature_prior_sigma"] == 0.5
    assert any("updated by this support" in note for note in meta["notes"])
    images, labels, queries = sample_support_and_queries()
    learner = build_learner(load_checkpoint(path))
    loo = leave_one_out(learner, images, labels)
    logits, _ = predict_cases(learner, images, labels, queries, torch.device("cpu"))
    fitted = SupportTemperature(CALIBRATED["temperature"], 0.5).fit(loo.support_logits, labels.numpy())
    assert meta["support_temperature"] == pytest.approx(fitted.temperature_)
    np.testing.assert_allclose([case.probabilities for case in result.cases], fitted.predict_proba(logits), rtol=1e-6, atol=1e-9)
    # the validation temperature alone gives other probabilities (same predictions)
    plain = adapt(path, SAMPLE_CASES, device="cpu", temperature_source="val")
    assert plain.metadata["temperature_source"] == "val" and plain.metadata["support_temperature"] is None
    assert [c.predicted for c in plain.cases] == [c.predicted for c in result.cases]
    assert not np.allclose([c.probabilities for c in plain.cases], [c.probabilities for c in result.cases])
    with pytest.raises(ValueError, match="temperature_source"):
        adapt(path, SAMPLE_CASES, device="cpu", temperature_source="test")


def test_adapt_support_temperature_falls_back_with_one_scan(tmp_path):
    from test_conformal_referral import CALIBRATED, _checkpoint, cases_with_one_triangle_mass_scan

    from medmeta.adaptation import adapt

    cases = cases_with_one_triangle_mass_scan(tmp_path)
    result = adapt(_checkpoint(tmp_path, CALIBRATED), cases, device="cpu", temperature_source="support")
    assert result.metadata["temperature_source"] == "val"
    assert any("validation temperature" in note and "triangle_mass" in note for note in result.metadata["notes"])
