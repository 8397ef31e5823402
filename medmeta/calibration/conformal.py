"""Split conformal prediction sets, calibrated on held-out (validation) conditions.

A *nonconformity score* ``s(x, y)`` says how badly label ``y`` fits case ``x`` (higher is
worse). Split conformal computes the scores of the true labels of ``n`` calibration cases and
takes their finite-sample quantile ``q``; the prediction set of a new case is every label with
``s(x, y) <= q``. If calibration and test cases are exchangeable, the set holds the true label
with probability at least ``coverage`` (and, with continuous scores, at most
``coverage + 1 / (n + 1)``), averaged over calibration sets and test cases (Vovk et al. 2005;
Angelopoulos & Bates 2021). See ``docs/calibration.md``.

Scores, on (temperature-scaled) probabilities ``p`` of one case:

- ``lac`` (least ambiguous set-valued classifier; Sadinle et al. 2019): ``s(x, y) = 1 - p_y``.
  The set is every label with ``p_y >= 1 - q``: the smallest sets on average; may be empty.
- ``aps`` (adaptive prediction sets; Romano et al. 2020), non-randomised:
  ``s(x, y) = sum of p_j over the labels j with p_j > p_y, plus p_y``: the probability mass
  of the labels sorted by decreasing probability, up to and including ``y`` (tied labels do not
  count each other's mass, so the score does not depend on their order). The set is the most
  probable labels whose cumulative mass stays within ``q``; sets adapt to how spread the
  probabilities are. Without the randomisation of Romano et al. the coverage is conservative
  (the top label's score is its own probability, so the set may be empty when ``q`` is below it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medmeta.errors import CalibrationError

SCORES = ("lac", "aps")
# Set membership tolerates float rounding of this size (sums of probabilities in APS).
SCORE_TOLERANCE = 1e-10


def conformal_quantile(scores: np.ndarray, coverage: float, interpolate: bool = False) -> float:
    """The split-conformal threshold of ``scores`` ``(n,)`` for target ``coverage = 1 - alpha``.

    The ``k``-th smallest score with ``k = ceil((n + 1) * coverage)``, i.e. the empirical
    quantile at level ``k / n`` (the smallest score whose empirical CDF reaches ``k / n``; numpy's
    ``method="inverted_cdf"``. numpy's ``method="higher"`` at ``k / n`` interpolates over
    ``n - 1`` gaps and would return the ``(k + 1)``-th smallest, one order statistic more
    conservative than the bound needs). ``+inf`` when ``k > n`` (too few calibration cases for
    that coverage: every label is then in every set).

    With ``interpolate``, the threshold is instead interpolated linearly between the order
    statistics around rank ``r = (n + 1) * coverage`` (the ``k``-th smallest of ``n`` continuous
    exchangeable scores is exceeded by a new score with probability ``1 - k / (n + 1)``, so rank
    ``r`` targets ``coverage`` itself rather than at least ``coverage``); the largest score when
    ``r > n``. Meant for a handful of calibration scores (e.g. one episode's support), where the
    rank steps by ``1 / (n + 1)`` (6% with 15 scores) and the guaranteed threshold over-covers by
    up to that much; coverage is then approximately, not at least, the target.
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = len(scores)
    if n == 0:
        raise CalibrationError("conformal calibration needs at least one calibration case")
    if interpolate:
        rank = (n + 1) * coverage  # 1-based, fractional
        if rank >= n:
            return float(scores[-1])
        low = max(int(math.floor(rank)), 1)
        fraction = min(max(rank - low, 0.0), 1.0)
        return float(scores[low - 1] + fraction * (scores[low] - scores[low - 1]))
    # the small offset keeps (n + 1) * coverage = 9.000000000000002 from rounding up to 10
    k = math.ceil((n + 1) * coverage - 1e-9)
    return math.inf if k > n else float(scores[max(k, 1) - 1])


def label_scores(probs: np.ndarray, score: str) -> np.ndarray:
    """Nonconformity score of every candidate label: ``(n, n_way)`` probabilities -> ``(n, n_way)``."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probabilities must have shape (n, n_way), got {probs.shape}")
    if score == "lac":
        return 1.0 - probs
    if score == "aps":
        # mass of the strictly more probable labels, plus the label's own probability
        higher = probs[:, None, :] > probs[:, :, None]  # (n, label, other): other more probable than label
        return (higher * probs[:, None, :]).sum(axis=2) + probs
    raise CalibrationError(f"unknown conformal score {score!r}; choose from {', '.join(SCORES)}")


class ConformalPredictor:
    """Split conformal prediction sets on top of calibrated class probabilities.

    Args:
        score: ``"lac"`` (``1 - p_true``) or ``"aps"`` (cumulative sorted probability mass up to
            and including the true label); see the module docstring.
        coverage: target probability ``1 - alpha`` that a set holds the true label, in (0, 1).
        class_conditional: Mondrian calibration over the *calibration* classes: one threshold
            per calibration class from that class's own scores, and the largest of them applied
            to every case. Test conditions are new classes, so no per-class threshold can be
            looked up for them; the largest threshold is conservative: it reaches the target
            coverage on every calibration class, not only on average over them.
        interpolate: interpolate the threshold between order statistics (see
            :func:`conformal_quantile`); for very few calibration cases.

    Attributes (after :meth:`fit`):
        threshold_: the score threshold applied at prediction time (``inf`` = every label).
        thresholds_: ``{class: threshold}`` per calibration class (``class_conditional`` only).
        n_calibration_: number of calibration cases.
    """

    def __init__(self, score: str = "lac", coverage: float = 0.9, class_conditional: bool = False, interpolate: bool = False):
        self.score = score
        self.coverage = coverage
        self.class_conditional = class_conditional
        self.interpolate = interpolate

    def fit(self, probs: np.ndarray, labels: np.ndarray, classes: np.ndarray | None = None) -> "ConformalPredictor":
        """Calibrate on held-out cases.

        Args:
            probs: ``(n, n_way)`` probabilities (those the sets will be built from at test time,
                e.g. temperature-scaled).
            labels: ``(n,)`` index of the true label in each row of ``probs``.
            classes: ``(n,)`` identity of each case's true class for Mondrian calibration (e.g.
                class names when ``labels`` are episode-local); defaults to ``labels``.

        Returns self.
        """
        if self.score not in SCORES:
            raise CalibrationError(f"unknown conformal score {self.score!r}; choose from {', '.join(SCORES)}")
        if not 0.0 < float(self.coverage) < 1.0:
            raise CalibrationError(f"target coverage must be between 0 and 1 (exclusive), got {self.coverage}")
        scores = self.scores(probs, labels)
        self.n_calibration_ = len(scores)
        if self.class_conditional:
            groups = np.asarray(labels if classes is None else classes)
            if groups.shape != scores.shape:
                raise ValueError(f"classes {groups.shape} must have the shape of labels {scores.shape}")
            self.thresholds_ = {
                str(c): conformal_quantile(scores[groups == c], self.coverage, self.interpolate)
                for c in sorted(np.unique(groups), key=str)
            }
            self.threshold_ = max(self.thresholds_.values())
        else:
            self.thresholds_ = {}
            self.threshold_ = conformal_quantile(scores, self.coverage, self.interpolate)
        return self

    def scores(self, probs: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Nonconformity scores: of the given ``labels`` ``(n,)`` -> ``(n,)``, or of every
        candidate label when ``labels`` is None -> ``(n, n_way)``."""
        all_scores = label_scores(probs, self.score)
        if labels is None:
            return all_scores
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(all_scores),):
            raise ValueError(f"labels must have shape ({len(all_scores)},), got {labels.shape}")
        return all_scores[np.arange(len(labels)), labels]

    def predict_sets(self, probs: np.ndarray) -> np.ndarray:
        """``(n, n_way)`` probabilities -> ``(n, n_way)`` bool: label ``j`` is in case ``i``'s set."""
        if not hasattr(self, "threshold_"):
            raise RuntimeError("call fit (or from_dict) before predict_sets")
        return self.scores(probs) <= self.threshold_ + SCORE_TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        """Hyperparameters and fitted threshold(s), JSON-ready (``None`` for an infinite threshold)."""
        finite = lambda t: None if not math.isfinite(t) else float(t)  # noqa: E731
        out: dict[str, Any] = {
            "score": self.score,
            "coverage": float(self.coverage),
            "class_conditional": bool(self.class_conditional),
            "interpolate": bool(self.interpolate),
            "threshold": finite(self.threshold_),
            "n_calibration": int(self.n_calibration_),
        }
        if self.class_conditional:
            out["thresholds_per_class"] = {c: finite(t) for c, t in self.thresholds_.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ConformalPredictor":
        """Rebuild a fitted predictor from :meth:`to_dict` (``None`` thresholds mean ``inf``)."""
        as_threshold = lambda t: math.inf if t is None else _number(t)  # noqa: E731
        try:
            predictor = cls(
                str(data["score"]), _number(data["coverage"]), bool(data.get("class_conditional", False)),
                bool(data.get("interpolate", False)),
            )
            predictor.threshold_ = as_threshold(data["threshold"])
            predictor.thresholds_ = {c: as_threshold(t) for c, t in (data.get("thresholds_per_class") or {}).items()}
            predictor.n_calibration_ = int(_number(data.get("n_calibration", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CalibrationError(f"incomplete conformal calibration record ({exc})") from None
        if predictor.score not in SCORES or not 0.0 < predictor.coverage < 1.0:
            raise CalibrationError(f"conformal record with unknown score {predictor.score!r} or coverage {predictor.coverage} outside (0, 1)")
        return predictor


def _number(value: Any) -> float:
    """A JSON number as a float; text, booleans and NaN are refused (ValueError)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{value!r} is not a number")
    return float(value)


# Where the threshold of a prediction set comes from: the validation conditions (the checkpoint's),
# the task's own support (leave-one-out), or no calibration at all (the probability mass,
# :class:`~medmeta.calibration.ProbabilityMassSets`: what "support" falls back to).
CONFORMAL_SOURCES = ("val", "support", "mass")
#: The calibration source ``adapt`` and ``evaluate`` use by default, for the sets and the
#: temperature alike: the support's own leave-one-out predictions, which held their coverage
#: (0.917, 0.912) and 5-shot ECE (0.016, 0.019) on derm-rare and mri-new-modality where the
#: validation-calibrated ones did not (docs/benchmarks.md); with one scan of some condition the
#: temperature is the validation one and the sets hold the most probable conditions up to the
#: target mass (the validation threshold left 1-shot sets on a new modality empty), and the
#: report says so.
DEFAULT_CALIBRATION_SOURCE = "support"


def check_conformal_source(source: str) -> str:
    """Refuse a conformal source outside :data:`CONFORMAL_SOURCES` (a :class:`ValueError` naming it)."""
    if source not in CONFORMAL_SOURCES:
        raise ValueError(f"conformal_source must be one of {', '.join(CONFORMAL_SOURCES)}, got {source!r}")
    return source


def episode_conformal(template: ConformalPredictor, support_probs: np.ndarray, support_labels: np.ndarray) -> ConformalPredictor:
    """A conformal predictor calibrated on one episode's own support (``conformal_source="support"``).

    The calibration scores are those of the support scans' true labels under their
    leave-one-out probabilities ``support_probs`` ``(n_support, n_way)`` (each from the fit on
    the other scans; see :mod:`medmeta.leave_one_out`), ``support_labels`` ``(n_support,)``.
    Support scans and cases of an episode come from the same conditions, so these scores are
    exchangeable with the cases' (validation conditions need not resemble the new ones), except
    that each was predicted from one scan fewer, which makes them slightly pessimistic and the
    sets slightly larger. With so few scores the threshold is interpolated between order
    statistics (:func:`conformal_quantile`), so coverage is close to, not guaranteed above, the
    target. Keeps ``template``'s score and coverage; never class-conditional (a handful of scans
    per condition cannot give per-condition thresholds).
    """
    return ConformalPredictor(template.score, template.coverage, class_conditional=False, interpolate=True).fit(
        support_probs, support_labels
    )
