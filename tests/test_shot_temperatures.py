"""Temperatures per shot: training fits one for each of the protocol's shots, and adapting to
a task uses the one fitted nearest to the task's own shot."""

from __future__ import annotations

import pytest

from medmeta import load_run
from medmeta.calibration import TemperatureScaler
from medmeta.data.episodes import EpisodeSampler
from medmeta.evaluation import run_episodes
from medmeta.training.calibration import CALIBRATION_SEED_OFFSET, fit_shot_temperatures


def test_training_stores_a_temperature_for_each_protocol_shot(trained_run):
    """The sample protocol's shots are 1 and 5; the run calibrates at 5 and fits a 1-shot
    temperature on the calibration classes' 1-shot episodes, for its own head and every other."""
    run = load_run(trained_run, device="cpu")
    record = run.checkpoint.calibration
    assert record.shot == 5 and set(record.shot_temperatures) == {1}
    # the stored 1-shot temperature is the one the same seeded 1-shot val episodes give
    sampler = EpisodeSampler(
        {c: run.protocol.records[c] for c in run.protocol.classes["val"]}, 2, 1, run.protocol.episodes.query,
        run.checkpoint.meta["training"]["config"]["seed"] + CALIBRATION_SEED_OFFSET,
    )
    outputs = run_episodes(run.learner, run.store(), sampler, range(40), run.device)
    assert record.shot_temperatures[1] == pytest.approx(TemperatureScaler().fit(*outputs.pooled()).temperature_, rel=1e-6)
    for head in ("prototype", "logistic", "finetune", "prototype+soft_kmeans"):
        per_head = run.checkpoint.calibration_for(head)
        assert set(per_head.shot_temperatures) == {1} and per_head.shot_temperatures[1] > 0, head


def test_a_shot_the_val_classes_cannot_fill_is_left_out(trained_run):
    run = load_run(trained_run, device="cpu")
    val = {c: run.protocol.records[c] for c in run.protocol.classes["val"]}
    sampler = EpisodeSampler(val, 2, 5, 2, seed=3)
    too_many = max(len(r) for r in val.values())  # shot + query above every class's scans
    fitted = fit_shot_temperatures(run.learner, run.store(), sampler, (5, 1, too_many), 3, run.device, quiet=True)
    assert set(fitted) == {1}  # 5 is the sampler's own shot; too_many cannot be drawn


def test_adapt_reports_the_temperature_of_its_shot(trained_run, tmp_path):
    """One scan of a condition: the 1-shot temperature, not the 5-shot one, and the note names it."""
    from conftest import SAMPLE_DATA

    import shutil

    from medmeta.adaptation import adapt

    cases = tmp_path / "cases"
    shutil.copytree(SAMPLE_DATA / "cases", cases)
    for extra in sorted((cases / "support" / "triangle_mass").iterdir())[1:]:
        extra.unlink()
    result = adapt(trained_run, cases, device="cpu", head="method")
    record = load_run(trained_run, device="cpu").checkpoint.calibration
    assert result.metadata["temperature"] == pytest.approx(record.shot_temperatures[1])
    assert result.metadata["temperature_source"] == "val"
    assert any(f"validation temperature {record.shot_temperatures[1]:.3g}" in note for note in result.metadata["notes"])
