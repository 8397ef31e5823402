"""Prediction sets from the calibrated probabilities alone, for tasks nothing can calibrate.

Split conformal needs calibration cases exchangeable with the new ones. An adaptation task with a
single support scan of some condition has none of its own (leaving the scan out removes the
condition), and the validation conditions are not exchangeable with new ones: on a new modality
the validation threshold, fitted on 2-way dermoscopy episodes, left 99% of 4-way brain-MRI sets
empty (docs/benchmarks.md). A threshold on ``1 - p`` fitted where two conditions share the
probability does not carry to a task where four do.

:class:`ProbabilityMassSets` takes, for each case, the most probable conditions until their
probability adds up to the target coverage (the condition that crosses it included; tied
conditions enter together). If the probabilities were calibrated, the set would hold the true
condition with probability at least ``coverage``. This is a property of the probabilities, not a
guarantee: it holds as far as the temperature does on the new conditions (an overconfident model
gets sets that cover less). The sets are never empty.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medmeta.calibration.conformal import SCORE_TOLERANCE
from medmeta.errors import CalibrationError


class ProbabilityMassSets:
    """The smallest set of most probable conditions whose probability reaches ``coverage``.

    Args:
        coverage: the probability mass a set must reach, in (0, 1).

    It has the prediction interface of :class:`~medmeta.calibration.ConformalPredictor`
    (``predict_sets``, ``to_dict``, ``coverage``, ``threshold_``: here the mass, ``score``:
    ``"mass"``); nothing is fitted (``n_calibration_`` is 0).
    """

    score = "mass"
    n_calibration_ = 0
    class_conditional = False

    def __init__(self, coverage: float = 0.9):
        if not 0.0 < float(coverage) < 1.0:
            raise CalibrationError(f"target coverage must be between 0 and 1 (exclusive), got {coverage}")
        self.coverage = float(coverage)
        self.threshold_ = self.coverage

    def predict_sets(self, probs: np.ndarray) -> np.ndarray:
        """``(n, n_way)`` probabilities -> ``(n, n_way)`` bool: a condition is in the set when the
        conditions strictly more probable than it hold less than ``coverage`` of the mass."""
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 2:
            raise ValueError(f"probabilities must have shape (n, n_way), got {probs.shape}")
        higher = probs[:, None, :] > probs[:, :, None]  # (n, label, other): other more probable than label
        mass_above = (higher * probs[:, None, :]).sum(axis=2)
        return mass_above < self.coverage - SCORE_TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "coverage": self.coverage, "class_conditional": False, "interpolate": False,
                "threshold": self.coverage, "n_calibration": 0}
