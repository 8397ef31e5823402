"""Evaluation results: warnings a reader must not miss, and the JSON they are written as."""

from __future__ import annotations

import numpy as np

from medmeta.calibration import CalibrationRecord
from medmeta.evaluation import EpisodeOutputs, evaluation_warnings, summarize


def _summary(n_cases: int = 600, covered: float = 0.9):
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(n_cases, 3))]
    labels = [rng.integers(0, 3, n_cases)]
    outputs = EpisodeOutputs(logits=logits, labels=labels, distances=[np.zeros(n_cases)], classes=[["a", "b", "c"]])
    summary = summarize(outputs)
    summary.coverage_target, summary.coverage = 0.9, covered
    return summary


def test_a_shot_other_than_the_calibrated_one_is_warned_about():
    record = CalibrationRecord(method="temperature", temperature=1.2, shot=5)
    assert evaluation_warnings(record, _summary(), shot=5) == []
    (warning,) = evaluation_warnings(record, _summary(), shot=1)
    assert "calibrated on 5-shot episodes but is measured at 1-shot" in warning and "--shot 1" in warning
    assert evaluation_warnings(CalibrationRecord(), _summary(), shot=1) == []  # nothing calibrated, nothing to say
    # a temperature fitted at that shot as well: nothing to warn about
    both = CalibrationRecord(method="temperature", temperature=1.2, shot=5, shot_temperatures={1: 2.0})
    assert evaluation_warnings(both, _summary(), shot=1) == []
    assert len(evaluation_warnings(both, _summary(), shot=3)) == 1


def test_coverage_below_target_beyond_sampling_noise_is_warned_about():
    record = CalibrationRecord(method="temperature", shot=5)
    # 600 cases: the 99% band around 0.9 is 2.58 * sqrt(0.09 / 600) = 0.0316
    assert evaluation_warnings(record, _summary(covered=0.87), shot=5) == []
    (warning,) = evaluation_warnings(record, _summary(covered=0.86), shot=5)
    assert "cover 86.0% of cases, below the 90% target" in warning
    assert evaluation_warnings(record, _summary(covered=0.99), shot=5) == []  # over-coverage is not a miss


def test_evaluate_json_holds_the_summary_and_warnings(trained_run, tmp_path):
    import json

    from medmeta import EvaluationSettings, evaluate

    # the method's own head, named (the stored default is chosen by calibration accuracies within noise)
    result = evaluate(trained_run, EvaluationSettings(shot=3, episodes=6, head="method", temperature_source="val"), device="cpu", out_dir=tmp_path, quiet=True)
    assert any("calibrated on 5-shot" in w for w in result.warnings)  # training fitted 5- and 1-shot temperatures, not 3
    data = json.loads((tmp_path / "evaluation_3way_3shot_support.json").read_text())
    assert data["accuracy"] == result.summary.accuracy and data["episodes"] == 6 and data["shot"] == 3
    assert data["warnings"] == result.warnings and data["figures"]["reliability"] == "reliability_3way_3shot_support.png"
    assert (tmp_path / "reliability_3way_3shot_support.png").stat().st_size > 0
