"""Prediction-set step: calibrated probabilities -> conformal sets (val or support threshold)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medmeta.calibration import ConformalPredictor, ProbabilityMassSets, check_conformal_source, episode_conformal
from medmeta.pipeline.temperature import Probabilities


@dataclass
class PredictionSets:
    """Output of the set step: ``sets`` ``(n_query, n_way)`` bool (None without a conformal
    calibration), the ``predictor`` that made them, the ``source`` actually used and whether
    ``"support"`` was asked for but not possible (``fell_back``: the sets are then ``"mass"``)."""

    sets: np.ndarray | None
    predictor: ConformalPredictor | ProbabilityMassSets | None
    source: str | None
    fell_back: bool = False


class PredictionSetStep:
    """Conformal prediction sets from the checkpoint's predictor.

    ``source="val"``: its threshold, fitted on validation conditions. ``source="support"``: a
    threshold fitted on this task's leave-one-out support probabilities (same score and
    coverage; :func:`~medmeta.calibration.episode_conformal`), falling back to ``"mass"`` when
    there are none (a condition with one support scan). ``source="mass"``: the most probable
    conditions up to the predictor's coverage of the calibrated probability
    (:class:`~medmeta.calibration.ProbabilityMassSets`). With no predictor (an old checkpoint)
    there are no sets.
    """

    def __init__(self, conformal: ConformalPredictor | None, source: str = "val"):
        self.conformal = conformal
        self.source = check_conformal_source(source)

    @property
    def needs_held_out(self) -> bool:
        return self.source == "support" and self.conformal is not None

    def __call__(self, probs: Probabilities, support_labels: np.ndarray) -> PredictionSets:
        if self.conformal is None:
            return PredictionSets(None, None, None)
        if self.source == "support" and probs.support is not None:
            predictor = episode_conformal(self.conformal, probs.support, support_labels)
            return PredictionSets(predictor.predict_sets(probs.query), predictor, "support")
        if self.source == "val":
            return PredictionSets(self.conformal.predict_sets(probs.query), self.conformal, "val")
        mass = ProbabilityMassSets(self.conformal.coverage)
        return PredictionSets(mass.predict_sets(probs.query), mass, "mass", self.source == "support")
