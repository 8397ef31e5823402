"""Calibration step: logits -> temperature-scaled probabilities (val or support-updated temperature)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medmeta.calibration import TEMPERATURE_PRIOR_SIGMA, SupportTemperature, check_temperature_source, softmax
from medmeta.calibration.record import nearest_shot_temperature
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
        val_temperature: the validation temperature for this task's shot (the prior's centre
            for ``"support"``); None: ``temperature``.
    """

    query: np.ndarray
    support: np.ndarray | None
    temperature: float
    source: str
    fell_back: bool = False
    val_temperature: float | None = None


class TemperatureStep:
    """Divide logits by a temperature and take the softmax.

    ``source="val"``: ``temperature`` (fitted on validation conditions by training).
    ``source="support"``: ``temperature`` updated by this task's leave-one-out support
    predictions (Bayes on ``log T`` with prior spread ``prior_sigma``; see
    :class:`~medmeta.calibration.SupportTemperature`); needs held-out support logits and falls
    back to ``"val"`` without them (``fell_back`` says so).

    ``by_shot`` (``{shot: temperature}``, from
    :meth:`~medmeta.calibration.CalibrationRecord.temperatures_by_shot`): validation temperatures
    fitted at several shots; a task uses the one fitted nearest to its own shot (its smallest
    number of support scans per condition) in place of ``temperature``.
    """

    def __init__(self, temperature: float = 1.0, source: str = "val", prior_sigma: float = TEMPERATURE_PRIOR_SIGMA,
                 by_shot: dict[int, float] | None = None):
        self.temperature = float(temperature)
        self.source = check_temperature_source(source)
        self.prior_sigma = float(prior_sigma)
        self.by_shot = dict(by_shot or {})

    def val_temperature(self, support_labels: np.ndarray | None) -> float:
        """The validation temperature for a task with these support labels ``(n_support,)``
        (None: ``temperature``)."""
        if support_labels is None:
            return self.temperature
        counts = np.bincount(np.asarray(support_labels, dtype=np.int64))
        counts = counts[counts > 0]
        shot = int(counts.min()) if len(counts) else None
        return nearest_shot_temperature(self.by_shot, shot, self.temperature)

    @property
    def needs_held_out(self) -> bool:
        return self.source == "support"

    def __call__(self, logits: Logits, support_labels: np.ndarray) -> Probabilities:
        held_out = logits.support_held_out
        val = self.val_temperature(support_labels)
        if self.source == "support" and held_out is not None:
            fitted = SupportTemperature(val, self.prior_sigma).fit(held_out, support_labels)
            return Probabilities(
                fitted.predict_proba(logits.query), fitted.predict_proba(held_out), fitted.temperature_, "support", val_temperature=val
            )
        support = softmax(held_out / val) if held_out is not None else None
        return Probabilities(softmax(logits.query / val), support, val, "val", self.source == "support", val_temperature=val)
