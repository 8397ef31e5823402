"""Calibration step: logits -> temperature-scaled probabilities (val or support-updated temperature)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medmeta.calibration import TEMPERATURE_PRIOR_SIGMA, SupportTemperature, check_temperature_source, softmax
from medmeta.pipeline.head import Logits


@dataclass
class Probabilities:
    """Output of the calibration step.

    Attributes:
        query: ``(n_query, n_way)`` calibrated probabilities of the cases.
        support: ``(n_support, n_way)`` calibrated leave-one-out probabilities of the support
            scans, or None when the head gave no held-out logits.
        temperature: the temperature used (the posterior summary for ``"support"``).
        source: ``"val"`` or ``"support"``, the source actually used.
        fell_back: True when ``"support"`` was asked for but the support could not provide it.
    """

    query: np.ndarray
    support: np.ndarray | None
    temperature: float
    source: str
    fell_back: bool = False


class TemperatureStep:
    """Divide logits by a temperature and take the softmax.

    ``source="val"``: ``temperature`` (fitted on validation conditions by training).
    ``source="support"``: ``temperature`` updated by this task's leave-one-out support
    predictions (Bayes on ``log T`` with prior spread ``prior_sigma``; see
    :class:`~medmeta.calibration.SupportTemperature`); needs held-out support logits and falls
    back to ``"val"`` without them (``fell_back`` says so).
    """

    def __init__(self, temperature: float = 1.0, source: str = "val", prior_sigma: float = TEMPERATURE_PRIOR_SIGMA):
        self.temperature = float(temperature)
        self.source = check_temperature_source(source)
        self.prior_sigma = float(prior_sigma)

    @property
    def needs_held_out(self) -> bool:
        return self.source == "support"

    def __call__(self, logits: Logits, support_labels: np.ndarray) -> Probabilities:
        held_out = logits.support_held_out
        if self.source == "support" and held_out is not None:
            fitted = SupportTemperature(self.temperature, self.prior_sigma).fit(held_out, support_labels)
            return Probabilities(fitted.predict_proba(logits.query), fitted.predict_proba(held_out), fitted.temperature_, "support")
        support = softmax(held_out / self.temperature) if held_out is not None else None
        return Probabilities(softmax(logits.query / self.temperature), support, self.temperature, "val", self.source == "support")
