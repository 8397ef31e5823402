"""The adaptation pipeline's steps, each on seeded tiny inputs, and the chain of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmeta.backbones import create_backbone
from medmeta.calibration import ConformalPredictor, ProbabilityMassSets, SupportTemperature, episode_conformal, softmax
from medmeta.methods import create_method
from medmeta.pipeline import (
    AdaptationPipeline,
    LearnerHead,
    Logits,
    PredictionSetStep,
    ReferralStep,
    Task,
    TemperatureStep,
)
from conftest import toy_episode

RNG = np.random.default_rng(7)
QUERY = RNG.normal(scale=2.0, size=(5, 3))
HELD_OUT = RNG.normal(scale=2.0, size=(6, 3))
SUPPORT_LABELS = np.array([0, 0, 1, 1, 2, 2])
LAC = ConformalPredictor.from_dict({"score": "lac", "coverage": 0.8, "threshold": 0.6})


def _task(shot: int = 2) -> Task:
    xs, ys, xq, yq = toy_episode(3, shot=shot, query=2, seed=4)
    return Task(xs, ys, xq, ["a", "b", "c"], yq)


def _protonet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_method("protonet", create_backbone("conv4", in_channels=1, hidden=8)).eval()


# ---- temperature --------------------------------------------------------------------------
def test_val_temperature_divides_the_logits():
    probs = TemperatureStep(2.0)(Logits(QUERY, np.zeros(5), HELD_OUT), SUPPORT_LABELS)
    np.testing.assert_allclose(probs.query, softmax(QUERY / 2.0))
    np.testing.assert_allclose(probs.support, softmax(HELD_OUT / 2.0))
    assert (probs.source, probs.temperature, probs.fell_back) == ("val", 2.0, False)


def test_support_temperature_is_the_posterior_of_the_support_and_falls_back_without_it():
    step = TemperatureStep(2.0, "support", prior_sigma=0.5)
    probs = step(Logits(QUERY, np.zeros(5), HELD_OUT), SUPPORT_LABELS)
    fitted = SupportTemperature(2.0, 0.5).fit(HELD_OUT, SUPPORT_LABELS)
    np.testing.assert_allclose(probs.query, fitted.predict_proba(QUERY))
    assert probs.source == "support" and probs.temperature == pytest.approx(fitted.temperature_)
    fallback = step(Logits(QUERY, np.zeros(5)), SUPPORT_LABELS)
    assert (fallback.source, fallback.fell_back, fallback.support) == ("val", True, None)
    np.testing.assert_allclose(fallback.query, softmax(QUERY / 2.0))
    assert step.needs_held_out and not TemperatureStep(2.0).needs_held_out
    with pytest.raises(ValueError, match="temperature_source"):
        TemperatureStep(1.0, "test")


def test_the_validation_temperature_follows_the_task_shot():
    """Temperatures fitted at 1 and 5 shots: a task's smallest number of scans per condition
    picks the nearer, for the validation probabilities and as the support update's prior."""
    step = TemperatureStep(2.0, "val", by_shot={1: 4.0, 5: 2.0})
    one_shot = np.array([0, 1, 1, 2, 2])  # condition 0 has one scan
    probs = step(Logits(QUERY, np.zeros(5)), one_shot)
    np.testing.assert_allclose(probs.query, softmax(QUERY / 4.0))
    assert probs.temperature == probs.val_temperature == 4.0
    assert step(Logits(QUERY, np.zeros(5)), np.repeat([0, 1, 2], 4)).temperature == 2.0  # 4 scans: nearer 5
    updated = TemperatureStep(2.0, "support", prior_sigma=0.5, by_shot={1: 4.0, 5: 2.0})(Logits(QUERY, np.zeros(5), HELD_OUT), SUPPORT_LABELS)
    expected = SupportTemperature(4.0, 0.5)  # two scans per condition: nearer the 1-shot temperature
    assert updated.temperature == pytest.approx(expected.fit(HELD_OUT, SUPPORT_LABELS).temperature_)
    assert TemperatureStep(3.0)(Logits(QUERY, np.zeros(5)), one_shot).temperature == 3.0  # none per shot


# ---- prediction sets ------------------------------------------------------------------------
def test_sets_use_the_checkpoint_threshold_or_one_fitted_on_the_support():
    probs = TemperatureStep(1.0)(Logits(QUERY, np.zeros(5), HELD_OUT), SUPPORT_LABELS)
    val = PredictionSetStep(LAC)(probs, SUPPORT_LABELS)
    np.testing.assert_array_equal(val.sets, softmax(QUERY) >= 0.4 - 1e-10)
    assert val.source == "val" and val.predictor is LAC
    support = PredictionSetStep(LAC, "support")(probs, SUPPORT_LABELS)
    expected = episode_conformal(LAC, softmax(HELD_OUT), SUPPORT_LABELS)
    assert support.source == "support" and support.predictor.threshold_ == pytest.approx(expected.threshold_)
    np.testing.assert_array_equal(support.sets, expected.predict_sets(softmax(QUERY)))
    no_held_out = TemperatureStep(1.0)(Logits(QUERY, np.zeros(5)), SUPPORT_LABELS)
    fallback = PredictionSetStep(LAC, "support")(no_held_out, SUPPORT_LABELS)
    assert (fallback.source, fallback.fell_back, fallback.predictor.coverage) == ("mass", True, LAC.coverage)
    np.testing.assert_array_equal(fallback.sets, ProbabilityMassSets(LAC.coverage).predict_sets(softmax(QUERY)))
    mass = PredictionSetStep(LAC, "mass")(probs, SUPPORT_LABELS)
    assert (mass.source, mass.fell_back) == ("mass", False)
    np.testing.assert_array_equal(mass.sets, fallback.sets)
    none = PredictionSetStep(None, "support")
    assert not none.needs_held_out and none(probs, SUPPORT_LABELS).sets is None


# ---- referral -------------------------------------------------------------------------------
def test_referral_step_flags_ambiguous_sets_and_far_cases():
    sets = np.array([[True, False], [True, True], [True, False]])
    out = ReferralStep(5.0)(sets, np.array([1.0, 1.0, 9.0]), ["x", "y"])
    assert out.refer.tolist() == [False, True, True]
    assert out.reasons[0] == "" and "2 conditions" in out.reasons[1] and "far from the support" in out.reasons[2]


# ---- head -----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 4, None])
def test_head_scores_cases_in_any_batch_size_like_the_learner(batch_size):
    learner, task = _protonet(), _task()
    logits = LearnerHead(learner, "cpu", batch_size)(task, held_out=True, stability=True, temperature=1.5)
    with torch.no_grad():
        expected = learner.fit_support(task.support_images, task.support_labels).predict_query(task.query_images)
        distances = learner.support_distance(task.query_images)
    np.testing.assert_allclose(logits.query, expected.double().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits.distances, distances.double().numpy(), rtol=1e-5, atol=1e-5)
    assert logits.query.dtype == np.float64 and logits.query.shape == (6, 3)
    assert logits.support_held_out.shape == (6, 3) and logits.max_change.shape == (6,)


def test_head_gives_no_held_out_logits_with_a_single_scan_of_a_condition():
    logits = LearnerHead(_protonet())(_task(shot=1), held_out=True, stability=True)
    assert logits.support_held_out is None and logits.max_change is None
    plain = LearnerHead(_protonet())(_task(), held_out=False, stability=False)
    assert plain.support_held_out is None and plain.max_change is None


# ---- the chain --------------------------------------------------------------------------------
def test_pipeline_chains_the_steps_and_asks_the_head_for_what_they_need():
    learner, task = _protonet(), _task()
    pipeline = AdaptationPipeline(
        LearnerHead(learner), TemperatureStep(1.3, "support"), PredictionSetStep(LAC, "support"), ReferralStep(None)
    )
    assert pipeline.needs_held_out
    diagnosis = pipeline(task)
    logits = LearnerHead(learner)(task, held_out=True)
    fitted = SupportTemperature(1.3).fit(logits.support_held_out, task.support_labels.numpy())
    np.testing.assert_allclose(diagnosis.probabilities.query, fitted.predict_proba(logits.query), rtol=1e-6)
    assert diagnosis.sets.source == "support" and diagnosis.sets.sets.shape == (6, 3)
    np.testing.assert_array_equal(diagnosis.referral.refer, diagnosis.sets.sets.sum(axis=1) != 1)
    assert diagnosis.predicted.tolist() == diagnosis.probabilities.query.argmax(1).tolist()
    assert diagnosis.logits.max_change is None  # stability was not asked for
    # the learner's weights are unchanged by the whole chain
    assert all(torch.equal(a, b) for a, b in zip(learner.state_dict().values(), _protonet().state_dict().values()))


def test_task_counts_support_scans_per_condition():
    task = _task(shot=2)
    assert task.n_way == 3 and task.support_counts() == [2, 2, 2] and task.has_two_per_condition()
    assert not _task(shot=1).has_two_per_condition()
