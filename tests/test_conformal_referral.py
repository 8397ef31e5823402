"""Conformal prediction sets, referral, MCE, risk-coverage and leave-one-out stability: exact on
hand-made inputs, and the coverage guarantee checked by simulation on exchangeable data."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medmeta.adaptation import adapt, leave_one_out_stability
from medmeta.backbones import create_backbone
from medmeta.calibration import (
    ConformalPredictor,
    DistanceThreshold,
    ProbabilityMassSets,
    aurc,
    conformal_quantile,
    expected_calibration_error,
    maximum_calibration_error,
    per_class_recall,
    referral,
    risk_at_coverage,
    risk_coverage_curve,
    softmax,
)
from medmeta.checkpoint import load_checkpoint, save_checkpoint
from medmeta.errors import CalibrationError
from medmeta.methods import create_method
from medmeta.methods.protonet import ProtoNet
from medmeta.reports import render_html, write_reports

SAMPLE_CASES = Path(__file__).resolve().parents[1] / "sample_data" / "cases"
CONDITIONS = ["concentric_rings", "gradient_halo", "triangle_mass"]


# ---- the finite-sample threshold -------------------------------------------------------------
def test_threshold_is_the_ceil_n_plus_1_quantile():
    scores = np.array([0.7, 0.1, 0.4, 0.3])  # sorted: 0.1 0.3 0.4 0.7
    assert conformal_quantile(scores, 0.5) == 0.4  # k = ceil(5 * 0.5) = 3 -> 3rd smallest
    assert conformal_quantile(scores, 0.4) == 0.3  # k = ceil(2.0) = 2
    assert conformal_quantile(scores, 0.8) == 0.7  # k = ceil(4.0) = 4
    assert conformal_quantile(scores, 0.81) == math.inf  # k = ceil(4.05) = 5 > n: every label
    # n = 9 at 90%: (n + 1) * 0.9 = 9 must not round up to 10 through float error
    nine = np.arange(1, 10) / 10
    assert conformal_quantile(nine, 0.9) == pytest.approx(0.9)
    for n, coverage in [(19, 0.9), (100, 0.95), (37, 0.8)]:
        s = np.random.default_rng(n).random(n)
        k = math.ceil((n + 1) * coverage)
        assert conformal_quantile(s, coverage) == np.sort(s)[k - 1] == np.quantile(s, k / n, method="inverted_cdf")


# ---- hand-computed sets ----------------------------------------------------------------------
def test_lac_sets_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 2, 1])
    cp = ConformalPredictor("lac", coverage=0.6).fit(probs, labels)
    # scores 1 - p_true: 0.3, 0.5, 0.4, 0.7; k = ceil(5 * 0.6) = 3 -> 0.5; the set is {y: p_y >= 0.5}
    np.testing.assert_allclose(cp.scores(probs, labels), [0.3, 0.5, 0.4, 0.7])
    assert cp.threshold_ == pytest.approx(0.5) and cp.n_calibration_ == 4
    test = np.array([[0.55, 0.4, 0.05], [0.5, 0.5, 0.0], [0.45, 0.35, 0.2]])
    assert cp.predict_sets(test).tolist() == [[True, False, False], [True, True, False], [False, False, False]]


def test_aps_sets_by_hand():
    cp = ConformalPredictor("aps", coverage=0.5)
    # mass of the more probable labels plus the label's own: [0.5, 0.3, 0.2] -> [0.5, 0.8, 1.0]
    np.testing.assert_allclose(cp.scores(np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])), [[0.5, 0.8, 1.0], [1.0, 0.6, 0.9]])
    # tied labels do not count each other's mass: [0.2, 0.2, 0.6] -> [0.8, 0.8, 0.6]
    np.testing.assert_allclose(cp.scores(np.array([[0.2, 0.2, 0.6]])), [[0.8, 0.8, 0.6]])
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])
    cp.fit(probs, np.array([1, 2, 0, 0]))  # true-label scores 0.8, 0.9, 0.7, 0.8
    assert cp.threshold_ == pytest.approx(0.8)  # k = ceil(5 * 0.5) = 3 -> sorted 0.7 0.8 0.8 0.9
    sets = cp.predict_sets(np.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]]))
    # non-randomised APS: the top label's own mass 0.9 exceeds 0.8, so the last set is empty
    assert sets.tolist() == [[True, True, False], [True, True, True], [False, False, False]]


def test_class_conditional_takes_the_largest_per_class_threshold():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55], [0.2, 0.8]])
    labels = np.array([0, 0, 0, 1, 1, 1])
    classes = np.array(["easy", "easy", "easy", "hard", "hard", "hard"])
    cp = ConformalPredictor("lac", coverage=0.5, class_conditional=True).fit(probs, labels, classes)
    # per class n = 3, k = ceil(4 * 0.5) = 2: easy scores 0.1 0.2 0.4 -> 0.2; hard 0.3 0.45 0.2 -> 0.3
    assert cp.thresholds_ == pytest.approx({"easy": 0.2, "hard": 0.3})
    assert cp.threshold_ == pytest.approx(0.3)
    # pooled (marginal) calibration: n = 6, k = ceil(3.5) = 4 -> sorted 0.1 0.2 0.2 0.3 0.4 0.45 -> 0.3
    assert ConformalPredictor("lac", coverage=0.5).fit(probs, labels).threshold_ == pytest.approx(0.3)
    record = json.loads(json.dumps(cp.to_dict()))
    again = ConformalPredictor.from_dict(record)
    assert again.threshold_ == cp.threshold_ and again.thresholds_ == cp.thresholds_ and again.class_conditional


def test_infinite_threshold_round_trips_as_null_and_keeps_every_label():
    cp = ConformalPredictor("aps", coverage=0.9).fit(np.array([[0.6, 0.4], [0.3, 0.7]]), np.array([0, 1]))
    assert cp.threshold_ == math.inf
    record = cp.to_dict()
    assert record["threshold"] is None and "NaN" not in json.dumps(record) and "Infinity" not in json.dumps(record)
    assert ConformalPredictor.from_dict(record).predict_sets(np.array([[0.99, 0.01]])).all()


def test_bad_settings_are_user_errors():
    with pytest.raises(CalibrationError, match="unknown conformal score"):
        ConformalPredictor("raps").fit(np.array([[0.5, 0.5]]), np.array([0]))
    with pytest.raises(CalibrationError, match="between 0 and 1"):
        ConformalPredictor("lac", coverage=1.0).fit(np.array([[0.5, 0.5]]), np.array([0]))
    with pytest.raises(CalibrationError, match="share of cases to refer"):
        DistanceThreshold(1.5).fit(np.ones(3))


def test_train_refuses_bad_calibration_settings_before_training(tmp_path, sample_protocol):
    from medmeta.training import TrainConfig, train

    with pytest.raises(CalibrationError, match="unknown conformal score"):
        train(TrainConfig(protocol=str(sample_protocol), out=str(tmp_path / "r"), conformal_score="x"), quiet=True)
    assert not (tmp_path / "r").exists()


# ---- coverage by simulation --------------------------------------------------------------------
def _exchangeable(rng: np.random.Generator, n: int, n_way: int = 4, sharpness: float = 0.5):
    """Model probabilities ``softmax(logits)`` and labels drawn from ``softmax(sharpness * logits)``
    (``sharpness < 1``: the model is over-confident; 1: it is calibrated)."""
    logits = rng.normal(scale=2.0, size=(n, n_way))
    true = softmax(logits * sharpness)
    labels = (true.cumsum(1) > rng.random((n, 1))).argmax(1)
    return softmax(logits), labels


def _coverage_trials(score: str, coverage: float, n_cal: int, n_test: int, trials: int, **data) -> np.ndarray:
    rng = np.random.default_rng(7)
    per_trial = np.empty(trials)
    for t in range(trials):
        probs, labels = _exchangeable(rng, n_cal + n_test, **data)
        cp = ConformalPredictor(score, coverage).fit(probs[:n_cal], labels[:n_cal])
        sets = cp.predict_sets(probs[n_cal:])
        per_trial[t] = sets[np.arange(n_test), labels[n_cal:]].mean()
    return per_trial


@pytest.mark.parametrize(
    "score, data",
    [("lac", {"n_way": 4, "sharpness": 0.5}), ("aps", {"n_way": 6, "sharpness": 1.0})],
)
def test_marginal_coverage_is_within_the_finite_sample_bound(score, data):
    coverage, n_cal, n_test, trials = 0.9, 200, 1000, 200
    per_trial = _coverage_trials(score, coverage, n_cal, n_test, trials, **data)
    se = per_trial.std(ddof=1) / math.sqrt(trials)
    lower, upper = coverage, coverage + 1 / (n_cal + 1)
    assert lower - 3 * se <= per_trial.mean() <= upper + 3 * se, (per_trial.mean(), se)
    # given the calibration set, coverage is Beta(k, n + 1 - k) (k = ceil((n+1)(1-alpha))), plus the
    # binomial noise of n_test test cases: the spread across trials should match it
    k = math.ceil((n_cal + 1) * coverage)
    a, b = k, n_cal + 1 - k
    expected_sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)) + coverage * (1 - coverage) / n_test)
    assert 0.75 * expected_sd < per_trial.std(ddof=1) < 1.25 * expected_sd
    assert per_trial.min() > 0.8 and per_trial.max() < 0.99


def test_aps_stays_valid_but_over_covers_when_the_true_label_is_often_the_least_probable():
    """The APS score of the least probable label is the whole mass, 1: when that happens to more
    than 1 - coverage of the calibration cases, the threshold is 1 and every set holds every
    label. The guarantee's lower bound still holds; the upper bound (continuous scores) does not."""
    per_trial = _coverage_trials("aps", 0.9, 200, 1000, 100, n_way=4, sharpness=0.5)
    se = per_trial.std(ddof=1) / math.sqrt(len(per_trial))
    assert per_trial.mean() >= 0.9 - 3 * se
    assert (per_trial == 1.0).any()


def _classes_of_unequal_difficulty(rng: np.random.Generator, n: int):
    """Three classes whose cases carry a strong, medium or weak signal for the right label."""
    labels = rng.integers(0, 3, n)
    signal = np.array([4.0, 2.0, 0.5])[labels]
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), labels] += signal
    return softmax(logits), labels


def test_class_conditional_covers_every_calibration_class():
    coverage, n_cal, n_test, trials = 0.9, 300, 900, 150
    rng = np.random.default_rng(11)
    mondrian, marginal = np.zeros((trials, 3)), np.zeros((trials, 3))
    for t in range(trials):
        probs, labels = _classes_of_unequal_difficulty(rng, n_cal + n_test)
        test_probs, test_labels = probs[n_cal:], labels[n_cal:]
        for row, cc in ((mondrian, True), (marginal, False)):
            cp = ConformalPredictor("lac", coverage, class_conditional=cc).fit(probs[:n_cal], labels[:n_cal], classes=labels[:n_cal])
            covered = cp.predict_sets(test_probs)[np.arange(n_test), test_labels]
            row[t] = [covered[test_labels == c].mean() for c in range(3)]
    se = mondrian.std(axis=0, ddof=1) / math.sqrt(trials)
    assert (mondrian.mean(axis=0) >= coverage - 3 * se).all(), mondrian.mean(axis=0)
    # the hardest class decides the threshold: it is covered at about the target, the others above
    assert mondrian.mean(axis=0)[2] < coverage + 0.03
    # marginal calibration reaches the target only on average: the hard class falls short
    assert marginal.mean(axis=0)[2] < coverage - 0.02


# ---- referral ----------------------------------------------------------------------------------
def test_distance_threshold_flags_the_intended_share():
    rng = np.random.default_rng(3)
    fitted = DistanceThreshold(0.05).fit(rng.lognormal(mean=2.0, sigma=0.4, size=10_000))
    assert fitted.n_calibration_ == 10_000
    fresh = rng.lognormal(mean=2.0, sigma=0.4, size=10_000)
    assert abs(fitted.flags(fresh).mean() - 0.05) <= 0.01
    assert DistanceThreshold(0.2).fit(fresh).flags(fresh).mean() == pytest.approx(0.2, abs=1e-3)
    # NaN distances are ignored when fitting and never flagged
    with_nans = np.concatenate([fresh, np.full(500, np.nan)])
    assert DistanceThreshold(0.05).fit(with_nans).threshold_ == DistanceThreshold(0.05).fit(fresh).threshold_
    none = DistanceThreshold(0.05).fit(np.full(10, np.nan))
    assert math.isnan(none.threshold_) and not none.flags(np.array([1.0, np.nan, 1e9])).any()


def test_referral_reasons_by_hand():
    sets = np.array(
        [
            [True, False, False],
            [True, True, False],
            [False, False, False],
            [False, False, True],
            [False, False, True],
            [True, True, True],
        ]
    )
    distances = np.array([1.0, 2.0, 12.3, np.nan, 10.0, 9.8])
    refer, reasons = referral(sets, distances, 9.8, ["A", "B", "C"])
    assert refer.tolist() == [False, True, True, False, True, True]
    assert reasons == [
        "",
        "prediction set holds 2 conditions (A, B)",
        "empty prediction set; far from the support scans (distance 12.3 > threshold 9.8)",
        "",
        "far from the support scans (distance 10 > threshold 9.8)",
        "prediction set holds 3 conditions (A, B, C)",
    ]
    # without sets only the distance refers; without a (finite) threshold only the sets do
    refer, reasons = referral(None, distances, 9.8, ["A", "B", "C"])
    assert refer.tolist() == [False, False, True, False, True, False]
    refer, _ = referral(sets, distances, float("nan"), ["A", "B", "C"])
    assert refer.tolist() == [False, True, True, False, False, True]


# ---- metrics -----------------------------------------------------------------------------------
def test_mce_by_hand():
    probs = np.array([[0.91, 0.09], [0.92, 0.08], [0.65, 0.35]])
    labels = np.array([0, 1, 0])
    # 15 bins: 0.91 and 0.92 share bin 13 (accuracy 0.5, confidence 0.915); 0.65 is alone in bin 9
    assert maximum_calibration_error(probs, labels) == pytest.approx(0.415)
    assert expected_calibration_error(probs, labels) == pytest.approx((2 * 0.415 + 0.35) / 3)


def test_risk_coverage_and_aurc_by_hand():
    confidence = np.array([0.6, 0.9, 0.7, 0.8])
    correct = np.array([False, True, True, False])
    # most confident first: 0.9 right, 0.8 wrong, 0.7 right, 0.6 wrong
    coverage, risk = risk_coverage_curve(confidence, correct)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.5, 1 / 3, 0.5])
    assert aurc(confidence, correct) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)
    np.testing.assert_allclose(risk_at_coverage(confidence, correct, np.array([0.25, 0.3, 0.75, 1.0])), [0.0, 0.5, 1 / 3, 0.5])


def test_per_class_recall_by_hand():
    true = np.array(["a", "a", "b", "b", "b", "c"])
    predicted = np.array(["a", "b", "b", "b", "c", "a"])
    assert per_class_recall(true, predicted) == {"a": 0.5, "b": pytest.approx(2 / 3), "c": 0.0}


def test_summarize_pools_sets_referral_and_recall_by_class_name():
    from medmeta.evaluation import EpisodeOutputs, summarize

    # two episodes with the classes in opposite order; logits = log-probabilities, temperature 1
    probs = [np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]), np.array([[0.8, 0.2], [0.5, 0.5], [0.7, 0.3]])]
    outputs = EpisodeOutputs(
        logits=[np.log(p) for p in probs],
        labels=[np.array([0, 1, 1]), np.array([0, 1, 0])],
        distances=[np.array([1.0, 2.0, 20.0]), np.array([3.0, 4.0, 5.0])],
        classes=[["x", "y"], ["y", "x"]],
    )
    lac = ConformalPredictor.from_dict({"score": "lac", "coverage": 0.9, "threshold": 0.5})  # set: p >= 0.5
    stats = summarize(outputs, sets=lac, referral=10.0)
    # sets: {x} {y} {x} | {y} {y, x} {y}; the 3rd case of episode 1 (true y) is not covered
    assert stats.coverage == pytest.approx(5 / 6) and stats.mean_set_size == pytest.approx(7 / 6)
    assert stats.per_class_coverage == {"x": 1.0, "y": 0.75}
    # referred: episode 1 case 3 (distance 20 > 10) and episode 2 case 2 (two conditions)
    assert stats.referral_rate == pytest.approx(1 / 3)
    assert stats.referral_rate_set == pytest.approx(1 / 6) and stats.referral_rate_distance == pytest.approx(1 / 6)
    assert stats.accuracy_not_referred == 1.0 and stats.n_not_referred == 4
    # the tie (0.5, 0.5) predicts label 0 = y while the truth is x
    assert stats.per_class_recall == {"x": 0.5, "y": 0.75}
    assert stats.accuracy == pytest.approx(2 / 3)
    bare = summarize(outputs)
    assert bare.coverage is None and bare.referral_rate is None and bare.per_class_recall == stats.per_class_recall



def test_summarize_with_support_calibrated_sets_fits_one_threshold_per_episode():
    from medmeta.evaluation import EpisodeOutputs, summarize
    from medmeta.pipeline import PredictionSetStep

    probs = [np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]), np.array([[0.8, 0.2], [0.5, 0.5], [0.7, 0.3]])]
    support = [np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]]), np.array([[0.95, 0.05], [0.9, 0.1], [0.1, 0.9], [0.05, 0.95]])]
    outputs = EpisodeOutputs(
        logits=[np.log(p) for p in probs],
        labels=[np.array([0, 1, 1]), np.array([0, 1, 0])],
        distances=[np.zeros(3), np.zeros(3)],
        classes=[["x", "y"], ["y", "x"]],
        support_logits=[np.log(p) for p in support],
        support_labels=[np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])],
    )
    template = ConformalPredictor.from_dict({"score": "lac", "coverage": 0.5, "threshold": 0.99})
    stats = summarize(outputs, sets=PredictionSetStep(template, "support"))
    # LAC scores of the support: 0.1 0.2 0.3 0.4 and 0.05 0.1 0.1 0.05; rank (4 + 1) * 0.5 = 2.5
    # interpolates between the 2nd and 3rd smallest: thresholds 0.25 and 0.075 (sets p >= 0.75, p >= 0.925)
    assert stats.conformal_source == "support"
    assert stats.support_threshold_mean == pytest.approx((0.25 + 0.075) / 2)
    # sets: {x} {} {} | {} {} {}: only the first case is covered
    assert stats.coverage == pytest.approx(1 / 6) and stats.mean_set_size == pytest.approx(1 / 6)
    assert stats.empty_set_rate == pytest.approx(5 / 6) and stats.referral_rate == pytest.approx(5 / 6)
    # without leave-one-out support predictions the checkpoint's threshold is used
    plain = EpisodeOutputs(logits=outputs.logits, labels=outputs.labels, distances=outputs.distances, classes=outputs.classes)
    # without leave-one-out support predictions: the most probable classes up to half the mass;
    # only the tie (0.5, 0.5) takes both classes
    fallback = summarize(plain, sets=PredictionSetStep(template, "support"))
    assert fallback.conformal_source == "mass" and fallback.mean_set_size == pytest.approx(7 / 6)
    val = summarize(plain, sets=PredictionSetStep(template, "val"))
    assert val.conformal_source == "val" and val.mean_set_size == pytest.approx(2.0)


def test_interpolated_quantile_by_hand_and_its_coverage_on_exchangeable_scores():
    scores = np.arange(1.0, 10.0)  # n = 9
    assert conformal_quantile(scores, 0.85, interpolate=True) == pytest.approx(8.5)  # rank 8.5
    assert conformal_quantile(scores, 0.5, interpolate=True) == pytest.approx(5.0)  # rank 5
    assert conformal_quantile(scores, 0.9, interpolate=True) == 9.0  # rank 9 = n: the largest
    assert conformal_quantile(scores, 0.05, interpolate=True) == 1.0  # rank 0.5: the smallest
    assert conformal_quantile(scores, 0.9) == 9.0 and conformal_quantile(scores, 0.85) == 9.0  # ceil(8.5) = 9
    # 15 calibration scores per trial (one 3-way 5-shot support): the guaranteed threshold covers
    # k / (n + 1) = 15/16 on average, the interpolated one the target itself
    rng = np.random.default_rng(0)
    calibration, new = rng.uniform(size=(20000, 15)), rng.uniform(size=20000)
    interpolated = np.mean([x <= conformal_quantile(c, 0.9, interpolate=True) for c, x in zip(calibration, new)])
    guaranteed = np.mean([x <= conformal_quantile(c, 0.9) for c, x in zip(calibration, new)])
    assert abs(interpolated - 0.9) < 0.006 and abs(guaranteed - 15 / 16) < 0.006
    predictor = ConformalPredictor("lac", 0.9, interpolate=True).fit(np.array([[0.8, 0.2], [0.3, 0.7]]), np.array([0, 1]))
    assert ConformalPredictor.from_dict(predictor.to_dict()).interpolate is True


def test_episode_conformal_keeps_the_score_and_coverage_and_interpolates():
    from medmeta.calibration import episode_conformal

    template = ConformalPredictor("aps", 0.8, class_conditional=True)
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
    fitted = episode_conformal(template, probs, np.array([0, 0, 1, 1]))
    assert (fitted.score, fitted.coverage, fitted.class_conditional, fitted.interpolate) == ("aps", 0.8, False, True)
    # APS scores of the true labels: 0.9, 0.6, 0.8, 0.55; rank 5 * 0.8 = 4 >= n: the largest
    assert fitted.threshold_ == pytest.approx(0.9)


# ---- stability ---------------------------------------------------------------------------------
def test_leave_one_out_stability_by_hand():
    """Identity backbone on 1-pixel images: features are the pixel values, logits -d^2."""
    learner = ProtoNet(nn.Flatten()).eval()
    support = torch.tensor([0.0, 2.0, 4.0, 6.0], dtype=torch.float64).view(4, 1, 1, 1)
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([3.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1)
    change = leave_one_out_stability(learner, support, labels, query)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731  p(class 0) = sigmoid(d1^2 - d0^2)
    # query 3: prototypes 1 and 5 give p = 0.5; leaving out 2 (prototype 0: 9 vs 4) or 4
    # (prototype 6: 4 vs 9) moves it to sigmoid(-5) or sigmoid(5): the change is sigmoid(5) - 0.5
    # query 1: d^2 0 vs 16; leaving out 6 (prototype 4: 0 vs 9) changes it the most
    expected = [sigmoid(5) - 0.5, sigmoid(16) - sigmoid(9)]
    np.testing.assert_allclose(change, expected, rtol=1e-9)
    # the temperature divides the logits before the softmax
    np.testing.assert_allclose(leave_one_out_stability(learner, support, labels, query, temperature=2.0)[0], sigmoid(2.5) - 0.5)
    with pytest.raises(ValueError, match="two support scans"):
        leave_one_out_stability(learner, support[1:], labels[1:], query)


def test_leave_one_out_support_logits_by_hand():
    from medmeta.leave_one_out import leave_one_out

    learner = ProtoNet(nn.Flatten()).eval()
    support = torch.tensor([0.0, 2.0, 4.0, 6.0], dtype=torch.float64).view(4, 1, 1, 1)
    loo = leave_one_out(learner, support, torch.tensor([0, 0, 1, 1]))
    # without 0: prototypes 2 and 5; without 2: 0 and 5; without 4: 1 and 6; without 6: 1 and 4;
    # the own class's squared distance (to a prototype of 1 scan instead of 2) is scaled by
    # (2^2 - 1) / 2^2 = 3/4: the expected squared distance to a mean of n draws is tr(S)(1 + 1/n)
    expected = -np.array([[4.0 * 0.75, 25.0], [4.0 * 0.75, 9.0], [9.0, 4.0 * 0.75], [25.0, 4.0 * 0.75]])
    np.testing.assert_allclose(loo.support_logits, expected)
    assert loo.max_change is None


class _ImagesOnly:
    """A learner's image interface alone, so leave-one-out refits it on the images."""

    def __init__(self, learner):
        self.learner = learner

    def __getattr__(self, name):
        if name in ("embed", "fit_embedded", "predict_embedded"):
            raise AttributeError(name)
        return getattr(self.learner, name)


def test_protonet_leave_one_out_embeds_every_scan_once():
    """ProtoNet refits on cached embeddings: each support and query scan passes the backbone
    once (not once per refit), with the logits and stability of refits on the images."""
    from medmeta.leave_one_out import leave_one_out

    torch.manual_seed(3)
    from conftest import CountingBackbone

    backbone = CountingBackbone(create_backbone("conv4", in_channels=1, hidden=8))
    learner = ProtoNet(backbone).eval()
    support, query = torch.randn(6, 1, 16, 16), torch.randn(4, 1, 16, 16)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    fast = leave_one_out(learner, support, labels, query, temperature=2.0)
    assert backbone.images_seen == 6 + 4
    backbone.images_seen = 0
    slow = leave_one_out(_ImagesOnly(learner), support, labels, query, temperature=2.0)
    assert backbone.images_seen == (6 + 4) + 6 * (5 + 1 + 4)  # the full fit, then six refits
    np.testing.assert_allclose(fast.support_logits, slow.support_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast.max_change, slow.max_change, rtol=1e-5, atol=1e-6)


# ---- adapt and the reports ---------------------------------------------------------------------
def _checkpoint(tmp_path: Path, calibration: dict) -> Path:
    torch.manual_seed(0)
    backbone_kwargs = {"in_channels": 1, "hidden": 8}
    learner = create_method("protonet", create_backbone("conv4", **backbone_kwargs)).eval()
    meta = {
        "method": {"name": "protonet", "hparams": learner.hparams()},
        "backbone": {"name": "conv4", "kwargs": backbone_kwargs},
        "preprocessing": {"image_size": 16, "channels": 1},
        "calibration": calibration,
    }
    return save_checkpoint(tmp_path / "best.json", learner, meta)


CALIBRATED = {
    "method": "temperature",
    "temperature": 1.0,
    "conformal": {"score": "lac", "coverage": 0.9, "class_conditional": False, "threshold": 0.6, "n_calibration": 100},
    "referral": {"share": 0.05, "distance_threshold": 1e9},
}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_adapt_gives_sets_referral_and_stability(tmp_path):
    path = _checkpoint(tmp_path, CALIBRATED)
    assert load_checkpoint(path).conformal.threshold_ == 0.6
    result = adapt(path, SAMPLE_CASES, device="cpu", conformal_source="val", temperature_source="val")
    assert result.metadata["stability"] == {"computed": True, "min_support_scans_per_condition": 5, "refits": 15}
    assert result.metadata["notes"] == []
    for case in result.cases:
        assert case.prediction_set == [c for c, p in zip(CONDITIONS, case.probabilities) if 1 - p <= 0.6 + 1e-10]
        assert case.refer == (len(case.prediction_set) != 1)
        assert 0.0 <= case.stability_max_change <= 1.0
    out = tmp_path / "report"
    write_reports(result, out)
    rows = _read_csv(out / "predictions.csv")
    assert list(rows[0])[-4:] == ["prediction_set", "refer", "refer_reason", "stability_max_change"]
    for row, case in zip(rows, result.cases):
        assert row["prediction_set"] == ";".join(case.prediction_set)
        assert row["refer"] == ("true" if case.refer else "false") and row["refer_reason"] == case.refer_reason
    report = json.loads((out / "report.json").read_text())  # standard JSON: NaN would fail below
    json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert report["cases"][0]["prediction_set"] == result.cases[0].prediction_set
    html = render_html(result)
    assert html.count('class="refer"') == sum(case.refer for case in result.cases)
    assert "stability: up to" in html


def test_adapt_with_a_single_support_scan_skips_stability(tmp_path):
    cases = tmp_path / "cases"
    shutil.copytree(SAMPLE_CASES, cases)
    for extra in sorted((cases / "support" / "triangle_mass").iterdir())[1:]:
        extra.unlink()
    result = adapt(_checkpoint(tmp_path, CALIBRATED), cases, device="cpu")
    assert all(case.stability_max_change is None for case in result.cases)
    assert result.metadata["stability"]["computed"] is False
    assert any("triangle_mass have a single support scan" in note for note in result.metadata["notes"])
    write_reports(result, tmp_path / "report")
    assert {row["stability_max_change"] for row in _read_csv(tmp_path / "report" / "predictions.csv")} == {""}


def test_adapt_with_support_calibrated_sets(tmp_path):
    path = _checkpoint(tmp_path, CALIBRATED)
    result = adapt(path, SAMPLE_CASES, device="cpu", stability=False, conformal_source="support", temperature_source="val")
    conformal = result.metadata["conformal"]
    assert conformal["source"] == "support" and conformal["interpolate"] is True and conformal["n_calibration"] == 15
    assert any("leave-one-out predictions (15 scans" in note for note in result.metadata["notes"])
    threshold = conformal["threshold"]
    assert threshold != 0.6
    for case in result.cases:
        assert case.prediction_set == [c for c, p in zip(CONDITIONS, case.probabilities) if 1 - p <= threshold + 1e-10]
        assert case.stability_max_change is None
    # the threshold is the interpolated quantile of the support's leave-one-out LAC scores
    from medmeta.leave_one_out import leave_one_out

    images, labels, _ = sample_support_and_queries()
    learner = load_checkpoint_learner(path)
    loo_probs = softmax(leave_one_out(learner, images, labels).support_logits)
    scores = 1 - loo_probs[np.arange(15), labels.numpy()]
    assert threshold == pytest.approx(conformal_quantile(scores, 0.9, interpolate=True))


def cases_with_one_triangle_mass_scan(tmp_path: Path) -> Path:
    """A copy of the demo cases whose condition ``triangle_mass`` keeps a single support scan."""
    cases = tmp_path / "cases"
    shutil.copytree(SAMPLE_CASES, cases)
    for extra in sorted((cases / "support" / "triangle_mass").iterdir())[1:]:
        extra.unlink()
    return cases


def sample_support_and_queries(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The demo cases' support images ``(15, 1, s, s)``, their labels ``(15,)`` (conditions in
    folder order) and the query images, read as ``adapt`` reads them."""
    from medmeta.adaptation import discover_cases
    from medmeta.data.reading import Preprocessing, ScanReader

    reader = ScanReader(Preprocessing(image_size=image_size, channels=1))
    found = discover_cases(SAMPLE_CASES)
    files, queries = found.support, found.query
    images = torch.stack([reader(f) for c in files for f in files[c]])
    labels = torch.tensor([i for i, c in enumerate(files) for _ in files[c]])
    return images, labels, torch.stack([reader(f) for f in queries])


def test_adapt_support_sets_fall_back_to_the_probability_mass_with_one_scan(tmp_path):
    cases = cases_with_one_triangle_mass_scan(tmp_path)
    result = adapt(_checkpoint(tmp_path, CALIBRATED), cases, device="cpu", conformal_source="support")
    mass = ProbabilityMassSets(result.metadata["conformal"]["coverage"])
    for case in result.cases:
        expected = mass.predict_sets(np.array([case.probabilities]))[0]
        assert case.prediction_set == [c for c, keep in zip(result.conditions, expected) if keep]
    assert any("most probable conditions up to 90%" in note and "triangle_mass" in note for note in result.metadata["notes"])
    assert result.metadata["conformal"]["source"] == "mass" and result.metadata["conformal"]["score"] == "mass"
    assert all(case.prediction_set for case in result.cases)  # mass sets are never empty
    html = render_html(result)
    assert "calibrated probabilities add up to 90%" in html and "split conformal" not in html
    with pytest.raises(ValueError, match="conformal_source"):
        adapt(_checkpoint(tmp_path, CALIBRATED), cases, device="cpu", conformal_source="test")


def load_checkpoint_learner(path):
    from medmeta.checkpoint import build_learner

    return build_learner(load_checkpoint(path))


def test_older_checkpoint_without_conformal_falls_back_and_says_so(tmp_path):
    result = adapt(_checkpoint(tmp_path, {"method": "temperature", "temperature": 1.3}), SAMPLE_CASES, device="cpu", stability=False)
    assert all(case.prediction_set is None and not case.refer for case in result.cases)
    notes = " ".join(result.metadata["notes"])
    assert "no conformal calibration" in notes and "no referral distance threshold" in notes
    write_reports(result, tmp_path / "report")
    header = list(_read_csv(tmp_path / "report" / "predictions.csv")[0])
    assert "prediction_set" not in header and "refer" not in header and "stability_max_change" in header
    assert "no conformal calibration" in (tmp_path / "report" / "report.html").read_text()
