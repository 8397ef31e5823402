"""The calibration a checkpoint carries: one typed record, written by training, read everywhere.

``medmeta train`` (and ``medmeta calibrate``) fit a temperature, a conformal predictor and a
referral distance threshold on val-class episodes; :class:`CalibrationRecord` is what they
store under the sidecar's ``calibration`` key and what ``adapt``, ``evaluate`` and the
benchmarks read back. Its JSON layout is the one checkpoints have always had, plus
``schema_version``; records written before the version existed read as version 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from medmeta.calibration.conformal import ConformalPredictor
from medmeta.errors import CalibrationError, MedmetaError

CALIBRATION_SCHEMA_VERSION = 1


def _optional_float(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalibrationError(f"calibration field {key!r} must be a number, got {value!r}")
    return float(value)


@dataclass
class ReferralRecord:
    """The out-of-distribution referral threshold and its evidence on held-out val episodes.

    ``distance_threshold`` is None in JSON when it is not finite: it then means ``inf`` when
    ``share`` is 0 (nothing is flagged) and NaN otherwise (the method has no distance to the
    support); :attr:`threshold` gives that float."""

    share: float
    distance_threshold: float | None = None
    n_calibration: int | None = None
    distance_flag_rate_val: float | None = None
    referral_rate_val: float | None = None

    @property
    def threshold(self) -> float:
        if self.distance_threshold is None or not math.isfinite(self.distance_threshold):
            return math.inf if self.share == 0 else math.nan
        return float(self.distance_threshold)

    def to_dict(self) -> dict[str, Any]:
        value = self.distance_threshold
        return {
            "share": self.share,
            "distance_threshold": value if value is not None and math.isfinite(value) else None,
            "n_calibration": self.n_calibration,
            "distance_flag_rate_val": self.distance_flag_rate_val,
            "referral_rate_val": self.referral_rate_val,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReferralRecord":
        share = _optional_float(data, "share")
        if share is None or not 0.0 <= share < 1.0:
            raise CalibrationError(f"referral share must be in [0, 1), got {data.get('share')!r}")
        n = data.get("n_calibration")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise CalibrationError(f"referral n_calibration must be a count, got {n!r}")
        return cls(
            share=share,
            distance_threshold=_optional_float(data, "distance_threshold"),
            n_calibration=n,
            distance_flag_rate_val=_optional_float(data, "distance_flag_rate_val"),
            referral_rate_val=_optional_float(data, "referral_rate_val"),
        )


@dataclass
class CalibrationRecord:
    """What a checkpoint knows about calibrating its probabilities, sets and referrals.

    Attributes:
        method: ``"temperature"`` once fitted, ``"none"`` before (temperature 1).
        temperature: divides the logits before the softmax (positive, finite).
        fitted_on: which episodes the fit used, in words.
        shot: support scans per class in those episodes (None: not recorded).
        n_bins: bins of the ECE figures below.
        ece_*: ECE before/after scaling on the fitting episodes and on held-out val episodes.
        accuracy_*: accuracy on the fitting episodes and on the held-out val episodes (what the
            default head is chosen by).
        shot_temperatures: ``{shot: temperature}`` fitted on val-class episodes of the
            protocol's other shots (a 1-shot support spreads its probabilities differently
            from a 5-shot one); :meth:`temperature_for` picks one for a task.
        conformal: the fitted :class:`ConformalPredictor`, or None (checkpoint without sets).
        conformal_evidence: ``fitted_on``, ``coverage_val`` and ``mean_set_size_val`` of the sets.
        referral: the distance threshold, or None (checkpoint without referral calibration).
        method_options: method hyperparameters switched by ``medmeta calibrate`` (or None).
    """

    method: str = "none"
    temperature: float = 1.0
    fitted_on: str | None = None
    shot: int | None = None
    n_bins: int = 15
    ece_before_fit_episodes: float | None = None
    ece_after_fit_episodes: float | None = None
    ece_before_val: float | None = None
    ece_after_val: float | None = None
    accuracy_fit_episodes: float | None = None
    accuracy_val: float | None = None
    shot_temperatures: dict[int, float] = field(default_factory=dict)
    conformal: ConformalPredictor | None = None
    conformal_evidence: dict[str, Any] = field(default_factory=dict)
    referral: ReferralRecord | None = None
    method_options: dict[str, Any] | None = None
    schema_version: int = CALIBRATION_SCHEMA_VERSION

    @property
    def fitted(self) -> bool:
        return self.method != "none"

    def temperatures_by_shot(self) -> dict[int, float]:
        """Every temperature with the shot it was fitted at: ``shot_temperatures`` and, when
        ``shot`` is recorded, ``{shot: temperature}``."""
        by_shot = dict(self.shot_temperatures)
        if self.shot is not None:
            by_shot[self.shot] = self.temperature
        return by_shot

    def temperature_for(self, shot: int | None) -> float:
        """The temperature for tasks with ``shot`` support scans per condition (see
        :func:`nearest_shot_temperature`); ``temperature`` when ``shot`` is None."""
        return nearest_shot_temperature(self.temperatures_by_shot(), shot, self.temperature)

    @property
    def distance_threshold(self) -> float | None:
        """The referral threshold (see :attr:`ReferralRecord.threshold`), None without referral."""
        return self.referral.threshold if self.referral is not None else None

    def notes(self, method_name: str) -> list[str]:
        """What this calibration cannot provide, as sentences for reports."""
        notes = []
        if self.conformal is None:
            notes.append("The checkpoint has no conformal calibration (trained before medmeta had it): no prediction sets.")
        threshold = self.distance_threshold
        if threshold is None:
            notes.append("The checkpoint has no referral distance threshold: no out-of-distribution flags.")
        elif threshold != threshold:  # NaN: the method has no distance to the support
            notes.append(f"{method_name} gives no distance to the support: no out-of-distribution flags.")
        return notes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in the sidecar layout (non-finite numbers become None)."""
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "method": self.method,
            "temperature": self.temperature,
        }
        for name in ("fitted_on", "shot", *_NUMBER_FIELDS):
            value = getattr(self, name)
            if value is not None:
                out[name] = value if not isinstance(value, float) or math.isfinite(value) else None
        if self.fitted:
            out["n_bins"] = self.n_bins
        if self.shot_temperatures:
            out["shot_temperatures"] = {str(s): float(t) for s, t in sorted(self.shot_temperatures.items())}
        if self.conformal is not None:
            out["conformal"] = {**self.conformal.to_dict(), **self.conformal_evidence}
        if self.referral is not None:
            out["referral"] = self.referral.to_dict()
        if self.method_options is not None:
            out["method_options"] = dict(self.method_options)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "CalibrationRecord":
        """Read and validate a sidecar's ``calibration`` entry; :class:`CalibrationError` names
        the field that is wrong."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise CalibrationError(f"the calibration entry must be a mapping, got {type(data).__name__}")
        version = data.get("schema_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise CalibrationError(f"calibration schema_version must be a positive integer, got {version!r}")
        if version > CALIBRATION_SCHEMA_VERSION:
            raise CalibrationError(f"calibration schema {version} is newer than this medmeta reads ({CALIBRATION_SCHEMA_VERSION})")
        method = data.get("method", "none")
        if method not in ("none", "temperature"):
            raise CalibrationError(f"unknown calibration method {method!r}")
        temperature = _optional_float(data, "temperature")
        temperature = 1.0 if temperature is None else temperature
        if not (math.isfinite(temperature) and temperature > 0):
            raise CalibrationError(f"temperature must be a positive finite number, got {data.get('temperature')!r}")
        n_bins = data.get("n_bins", 15)
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise CalibrationError(f"calibration n_bins must be a positive integer, got {n_bins!r}")
        conformal, evidence = _conformal(data.get("conformal"))
        referral = data.get("referral")
        if referral is not None and not isinstance(referral, dict):
            raise CalibrationError("the referral entry must be a mapping")
        options = data.get("method_options")
        if options is not None and not isinstance(options, dict):
            raise CalibrationError("calibration method_options must be a mapping")
        fitted_on = data.get("fitted_on")
        return cls(
            method=method,
            temperature=temperature,
            fitted_on=str(fitted_on) if fitted_on is not None else None,
            shot=_shot(data),
            shot_temperatures=_shot_temperatures(data.get("shot_temperatures")),
            n_bins=n_bins,
            conformal=conformal,
            conformal_evidence=evidence,
            referral=ReferralRecord.from_dict(referral) if referral else None,
            method_options=options,
            schema_version=version,
            **{name: _optional_float(data, name) for name in _NUMBER_FIELDS},
        )


def _conformal(record: Any) -> tuple[ConformalPredictor | None, dict[str, Any]]:
    """The predictor of a ``conformal`` entry and the evidence stored beside it."""
    if not record:
        return None, {}
    if not isinstance(record, dict):
        raise CalibrationError("the conformal entry must be a mapping")
    try:
        conformal = ConformalPredictor.from_dict(record)
    except MedmetaError as exc:
        raise CalibrationError(str(exc)) from None
    predictor_keys = set(conformal.to_dict())
    return conformal, {k: v for k, v in record.items() if k not in predictor_keys}


def nearest_shot_temperature(by_shot: dict[int, float], shot: int | None, default: float) -> float:
    """The temperature of ``by_shot`` (``{shot: temperature}``) fitted at the shot nearest to
    ``shot`` (the larger of two equally near); ``default`` when ``shot`` is None or there is
    none."""
    if shot is None or not by_shot:
        return float(default)
    nearest = min(by_shot, key=lambda s: (abs(s - shot), -s))
    return float(by_shot[nearest])


def _shot_temperatures(data: Any) -> dict[int, float]:
    """``{"1": 1.7}`` from a sidecar -> ``{1: 1.7}``; anything else is refused, naming the field."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CalibrationError("calibration shot_temperatures must be a mapping of shot to temperature")
    out = {}
    for key, value in data.items():
        if not str(key).isdigit() or int(key) < 1:
            raise CalibrationError(f"calibration shot_temperatures: shot {key!r} is not a positive integer")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise CalibrationError(f"calibration shot_temperatures: temperature {value!r} for shot {key} is not a positive number")
        out[int(key)] = float(value)
    return out


def _shot(data: dict[str, Any]) -> int | None:
    """The calibration shot; records written before the field say it in ``fitted_on`` ("... 5-shot)")."""
    shot = data.get("shot")
    if shot is not None and (isinstance(shot, bool) or not isinstance(shot, int) or shot < 1):
        raise CalibrationError(f"calibration shot must be a positive integer, got {shot!r}")
    if shot is None and isinstance(data.get("fitted_on"), str):
        found = re.search(r"(\d+)-shot", data["fitted_on"])
        shot = int(found.group(1)) if found else None
    return shot


_NUMBER_FIELDS = tuple(f.name for f in fields(CalibrationRecord) if f.name.startswith(("ece_", "accuracy_")))
