"""Referral: which cases a clinician should look at first, and why.

A case is referred when its conformal prediction set does not hold exactly one condition
(empty: no condition fits well enough; several: the model cannot tell them apart at the target
coverage), or when it is far from the support scans (out of distribution): its distance to the
adapted support (``MetaLearner.support_distance``) is above a threshold calibrated on
validation-class episodes so that a chosen share of in-distribution cases is flagged.
See ``docs/calibration.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from medmeta.errors import CalibrationError


class DistanceThreshold:
    """The distance above which a case counts as far from the support scans.

    Args:
        flag_rate: share of in-distribution cases to flag, in [0, 1); the threshold is the
            ``1 - flag_rate`` quantile (linear interpolation) of the calibration distances.

    Attributes (after :meth:`fit`):
        threshold_: the distance threshold; NaN when no calibration distance is finite (methods
            without a natural distance), in which case nothing is ever flagged.
        n_calibration_: number of finite calibration distances.
    """

    def __init__(self, flag_rate: float = 0.05):
        self.flag_rate = flag_rate

    def fit(self, distances: np.ndarray) -> "DistanceThreshold":
        """``distances`` ``(n,)`` of in-distribution (validation query) cases; NaNs are ignored.
        Returns self."""
        if not 0.0 <= float(self.flag_rate) < 1.0:
            raise CalibrationError(f"the share of cases to refer must be in [0, 1), got {self.flag_rate}")
        distances = np.asarray(distances, dtype=np.float64).ravel()
        finite = distances[np.isfinite(distances)]
        self.n_calibration_ = len(finite)
        if len(finite) == 0 or self.flag_rate == 0.0:
            self.threshold_ = math.nan if len(finite) == 0 else math.inf
        else:
            self.threshold_ = float(np.quantile(finite, 1.0 - float(self.flag_rate)))
        return self

    def flags(self, distances: np.ndarray) -> np.ndarray:
        """``(n,)`` distances -> ``(n,)`` bool: above the threshold (never for NaN)."""
        if not hasattr(self, "threshold_"):
            raise RuntimeError("call fit before flags")
        return distance_flags(distances, self.threshold_)


def distance_flags(distances: np.ndarray, threshold: float | None) -> np.ndarray:
    """``(n,)`` bool: ``distance > threshold``; False where either is NaN or the threshold is None."""
    distances = np.asarray(distances, dtype=np.float64)
    if threshold is None or math.isnan(threshold):
        return np.zeros(distances.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(distances, nan=-math.inf) > threshold


def referral(
    sets: np.ndarray | None,
    distances: np.ndarray,
    threshold: float | None,
    conditions: Sequence[str],
) -> tuple[np.ndarray, list[str]]:
    """Decide which cases to refer and say why.

    Args:
        sets: ``(n, n_way)`` bool prediction sets (:meth:`ConformalPredictor.predict_sets`), or
            None when there are no sets (then only the distance can refer a case).
        distances: ``(n,)`` distance of each case to the support scans (NaN: unknown).
        threshold: distance threshold (:class:`DistanceThreshold`); None or NaN: not used.
        conditions: the ``n_way`` condition names, in column order of ``sets``.

    Returns ``(refer, reasons)``: ``(n,)`` bool and one string per case, its reasons joined by
    ``"; "`` (empty when not referred), e.g. ``"prediction set holds 2 conditions (A, B)"``,
    ``"empty prediction set"``, ``"far from the support scans (distance 12.3 > threshold 9.8)"``.
    """
    distances = np.asarray(distances, dtype=np.float64).ravel()
    n = len(distances)
    if sets is not None:
        sets = np.asarray(sets, dtype=bool)
        if sets.shape != (n, len(conditions)):
            raise ValueError(f"sets must have shape ({n}, {len(conditions)}), got {sets.shape}")
    far = distance_flags(distances, threshold)
    refer = np.zeros(n, dtype=bool)
    reasons: list[str] = []
    for i in range(n):
        why = []
        if sets is not None:
            members = [c for c, inside in zip(conditions, sets[i]) if inside]
            if not members:
                why.append("empty prediction set")
            elif len(members) > 1:
                why.append(f"prediction set holds {len(members)} conditions ({', '.join(members)})")
        if far[i]:
            why.append(f"far from the support scans (distance {distances[i]:.3g} > threshold {threshold:.3g})")
        refer[i] = bool(why)
        reasons.append("; ".join(why))
    return refer, reasons
