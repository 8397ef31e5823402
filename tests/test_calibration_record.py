"""The calibration record a checkpoint carries: round trip, older layouts, refusals."""

from __future__ import annotations

import json
import math

import pytest

from medmeta.calibration import CALIBRATION_SCHEMA_VERSION, CalibrationRecord, ConformalPredictor, ReferralRecord
from medmeta.errors import CalibrationError

# the layout checkpoints were written in before the record had a schema version
OLD = {
    "method": "temperature", "temperature": 0.52, "fitted_on": "200 val-class episodes (2-way 5-shot)", "n_bins": 15,
    "ece_before_fit_episodes": 0.11, "ece_after_fit_episodes": 0.01, "ece_before_val": 0.11, "ece_after_val": 0.02,
    "conformal": {"score": "lac", "coverage": 0.9, "class_conditional": False, "threshold": 0.71, "n_calibration": 6000,
                  "fitted_on": "query cases", "coverage_val": 0.91, "mean_set_size_val": 1.3},
    "referral": {"share": 0.05, "distance_threshold": 9.8, "n_calibration": 6000, "distance_flag_rate_val": 0.05,
                 "referral_rate_val": 0.31},
}


def test_an_older_record_reads_as_version_one_and_round_trips():
    record = CalibrationRecord.from_dict(OLD)
    assert record.schema_version == 1 == CALIBRATION_SCHEMA_VERSION
    assert record.temperature == 0.52 and record.shot == 5  # the shot is read from fitted_on
    assert record.conformal.threshold_ == 0.71 and record.conformal_evidence["coverage_val"] == 0.91
    assert record.distance_threshold == 9.8 and record.referral.referral_rate_val == 0.31
    again = CalibrationRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again.to_dict() == record.to_dict() and again.conformal.to_dict() == record.conformal.to_dict()
    assert {k: v for k, v in record.to_dict().items() if k not in ("schema_version", "shot")} == {
        **OLD, "conformal": {**OLD["conformal"], "interpolate": False}
    }


def test_the_placeholder_and_missing_entries():
    empty = CalibrationRecord.from_dict(None)
    assert (empty.method, empty.temperature, empty.conformal, empty.distance_threshold) == ("none", 1.0, None, None)
    assert not empty.fitted and empty.to_dict() == {"schema_version": 1, "method": "none", "temperature": 1.0}
    assert len(empty.notes("protonet")) == 2


def test_a_null_distance_threshold_means_infinite_with_share_zero_and_nan_otherwise():
    assert ReferralRecord(share=0.0).threshold == math.inf
    assert math.isnan(ReferralRecord(share=0.05).threshold)
    record = CalibrationRecord.from_dict({**OLD, "referral": {"share": 0.05, "distance_threshold": None}})
    assert "no distance to the support" in " ".join(record.notes("matching"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"temperature": -1}, "temperature must be a positive finite"),
        ({"temperature": 0}, "temperature must be a positive finite"),
        ({"temperature": "1.5"}, "must be a number"),
        ({"schema_version": 99}, "newer than this medmeta reads"),
        ({"schema_version": "1"}, "schema_version must be a positive integer"),
        ({"method": "platt"}, "unknown calibration method"),
        ({"n_bins": 0}, "n_bins must be a positive integer"),
        ({"shot": 0}, "shot must be a positive integer"),
        ({"conformal": {"score": "lac"}}, "incomplete conformal"),
        ({"conformal": "lac"}, "conformal entry must be a mapping"),
        ({"referral": {"share": 2.0}}, "referral share"),
        ({"referral": {"share": 0.05, "distance_threshold": "far"}}, "must be a number"),
        ({"method_options": ["x"]}, "method_options must be a mapping"),
        ({"shot_temperatures": [1.5]}, "shot_temperatures must be a mapping"),
        ({"shot_temperatures": {"one": 1.5}}, "shot 'one' is not a positive integer"),
        ({"shot_temperatures": {"0": 1.5}}, "shot '0' is not a positive integer"),
        ({"shot_temperatures": {"1": 0}}, "temperature 0 for shot 1"),
        ({"shot_temperatures": {"1": "2"}}, "temperature '2' for shot 1"),
    ],
)
def test_malformed_or_out_of_bounds_records_are_refused(change, message):
    with pytest.raises(CalibrationError, match=message):
        CalibrationRecord.from_dict({**OLD, **change})


def test_a_checkpoint_with_a_bad_record_names_its_file(tmp_path):
    import torch

    from medmeta.checkpoint import load_checkpoint, save_checkpoint
    from medmeta.errors import CheckpointError

    path = save_checkpoint(tmp_path / "m.json", torch.nn.Linear(2, 2), {"method": {"name": "protonet"},
                                                                       "calibration": {**OLD, "temperature": -1}})
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"m\.json: invalid calibration record"):
        ckpt.temperature


def test_the_record_is_what_conformal_predictors_serialise():
    predictor = ConformalPredictor.from_dict(OLD["conformal"])
    record = CalibrationRecord(method="temperature", temperature=2.0, conformal=predictor)
    assert record.to_dict()["conformal"] == predictor.to_dict()


@pytest.mark.parametrize("shot, expected", [(5, 0.52), (1, 1.7), (3, 0.52), (2, 1.7), (4, 0.52), (10, 0.8), (None, 0.52)])
def test_the_temperature_of_the_nearest_calibrated_shot(shot, expected):
    """5-shot is the record's own temperature, 1 and 8 come from ``shot_temperatures``; a shot
    between two takes the nearer one, the larger of two equally near (3 -> 5)."""
    record = CalibrationRecord.from_dict({**OLD, "shot_temperatures": {"1": 1.7, "8": 0.8}})
    assert record.temperatures_by_shot() == {1: 1.7, 5: 0.52, 8: 0.8}
    assert record.temperature_for(shot) == expected


def test_shot_temperatures_round_trip_and_stay_out_when_empty():
    record = CalibrationRecord.from_dict({**OLD, "shot_temperatures": {"1": 1.7}})
    assert record.shot_temperatures == {1: 1.7}
    data = json.loads(json.dumps(record.to_dict()))
    assert data["shot_temperatures"] == {"1": 1.7} and CalibrationRecord.from_dict(data).to_dict() == data
    assert "shot_temperatures" not in CalibrationRecord.from_dict(OLD).to_dict()
    assert CalibrationRecord(temperature=2.0).temperature_for(1) == 2.0  # nothing per shot: the temperature
