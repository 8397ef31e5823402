"""Referral step: prediction sets and support distances -> who is referred for review, and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medmeta.calibration import referral


@dataclass
class Referral:
    """``refer`` ``(n_query,)`` bool and one reason string per case (empty when not referred)."""

    refer: np.ndarray
    reasons: list[str]


class ReferralStep:
    """Refer a case whose set is not a single condition or that lies farther from the support
    than ``distance_threshold`` (None or NaN: distance not used); see
    :func:`medmeta.calibration.referral`. ``enabled`` is False when the checkpoint has neither
    sets nor a threshold (then nothing is referred and reports leave the columns out)."""

    def __init__(self, distance_threshold: float | None):
        self.distance_threshold = distance_threshold

    def __call__(self, sets: np.ndarray | None, distances: np.ndarray, conditions: Sequence[str]) -> Referral:
        refer, reasons = referral(sets, distances, self.distance_threshold, conditions)
        return Referral(refer, reasons)
