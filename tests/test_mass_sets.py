"""Probability-mass prediction sets: the fallback when nothing can calibrate a threshold."""

from __future__ import annotations

import numpy as np
import pytest

from medmeta.calibration import ProbabilityMassSets
from medmeta.errors import CalibrationError

CASES = [
    # [probabilities, coverage, expected set]
    [[0.7, 0.2, 0.1], 0.9, [True, True, False]],  # 0.7 < 0.9, 0.9 reaches it
    [[0.7, 0.2, 0.1], 0.6, [True, False, False]],  # the top class alone reaches 0.6
    [[0.5, 0.25, 0.25], 0.6, [True, True, True]],  # tied classes enter together
    [[0.95, 0.03, 0.02], 0.9, [True, False, False]],
    [[0.3, 0.3, 0.4], 0.35, [False, False, True]],
    [[0.3, 0.3, 0.4], 0.5, [True, True, True]],
    [[0.1, 0.6, 0.3], 0.89, [False, True, True]],  # 0.6 + 0.3 = 0.9 reaches 0.89
    [[0.1, 0.6, 0.3], 0.9, [False, True, True]],  # reaching exactly the target is enough
]


@pytest.mark.parametrize("probs, coverage, expected", CASES)
def test_sets_by_hand(probs, coverage, expected):
    sets = ProbabilityMassSets(coverage).predict_sets(np.array([probs]))
    np.testing.assert_array_equal(sets[0], expected)


def test_sets_are_never_empty_and_hold_at_least_the_mass():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(5, 0.3), size=2000)
    sets = ProbabilityMassSets(0.8).predict_sets(probs)
    assert sets.sum(axis=1).min() >= 1
    held = (probs * sets).sum(axis=1)
    assert held.min() >= 0.8 - 1e-12
    # minimal: without its least probable member, every set holds less than the target
    least = np.where(sets, probs, np.inf).min(axis=1)
    assert np.all((held - least < 0.8) | (sets.sum(axis=1) == 1))


def test_calibrated_probabilities_give_the_target_coverage():
    """Labels drawn from the probabilities themselves (perfect calibration): the sets cover at
    least the target, and not much more (only the crossing class overshoots)."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=20000)
    labels = np.array([rng.choice(4, p=p) for p in probs])
    sets = ProbabilityMassSets(0.9).predict_sets(probs)
    coverage = sets[np.arange(len(labels)), labels].mean()
    expected = (probs * sets).sum(axis=1).mean()  # the mass the sets hold
    assert 0.9 <= expected < 0.97
    assert coverage == pytest.approx(expected, abs=0.01)


def test_record_and_refusals():
    mass = ProbabilityMassSets(0.85)
    assert mass.to_dict() == {"score": "mass", "coverage": 0.85, "class_conditional": False, "interpolate": False,
                              "threshold": 0.85, "n_calibration": 0}
    assert mass.threshold_ == 0.85
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(CalibrationError, match="between 0 and 1"):
            ProbabilityMassSets(bad)
    with pytest.raises(ValueError, match=r"\(n, n_way\)"):
        mass.predict_sets(np.array([0.5, 0.5]))
