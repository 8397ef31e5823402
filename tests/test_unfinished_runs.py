"""A run that did not finish, or a run folder that already holds a model, is never used or
replaced silently."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from medmeta.cli.main import app
from medmeta.errors import CheckpointError, MedmetaError
from medmeta.run import load_run

runner = CliRunner()


def _unfinished(trained_run, tmp_path):
    """The run as it is on disk when training is killed before calibration."""
    from medmeta.calibration import CalibrationRecord

    run = tmp_path / "killed"
    shutil.copytree(trained_run, run)
    meta = json.loads((run / "best.json").read_text())
    meta["calibration"] = CalibrationRecord().to_dict()
    (run / "best.json").write_text(json.dumps(meta))
    return run


def test_an_unfinished_run_is_refused_unless_asked_for(trained_run, tmp_path):
    run = _unfinished(trained_run, tmp_path)
    with pytest.raises(CheckpointError, match="did not finish .* --allow-unfinished"):
        load_run(run, device="cpu")
    assert not load_run(run, device="cpu", allow_unfinished=True).calibration.fitted
    result = runner.invoke(app, ["adapt", "--checkpoint", str(run), "--cases", "sample_data/cases", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "did not finish" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(run), "--episodes", "2"])
    assert result.exit_code == 2 and "did not finish" in result.output


def test_calibrating_an_unfinished_run_finishes_it(trained_run, tmp_path):
    from medmeta.training.calibration import recalibrate

    run = _unfinished(trained_run, tmp_path)
    assert recalibrate(run, device="cpu", quiet=True).fitted
    assert load_run(run, device="cpu").calibration.fitted


def test_training_into_a_folder_that_holds_a_run_is_refused_without_overwrite(trained_run, tmp_path):
    from medmeta.training import TrainConfig, train

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / "best.safetensors").read_bytes()
    with pytest.raises(MedmetaError, match="already holds a training run .*--resume.*--overwrite"):
        train(TrainConfig(out=str(run), episodes=1, pretrain_epochs=0, device="cpu"), quiet=True)
    result = runner.invoke(app, ["train", "--out", str(run), "--episodes", "1", "--pretrain-epochs", "0"])
    assert result.exit_code == 2 and "already holds a training run" in result.output
    assert (run / "best.safetensors").read_bytes() == before


def test_resume_refuses_options_that_differ_from_the_run_and_writes_where_out_says(trained_run, tmp_path):
    from medmeta.training import TrainConfig
    from medmeta.training.resume import check_resume_options, resumed_config

    moved = tmp_path / "moved"
    shutil.copytree(trained_run, moved)
    result = runner.invoke(app, ["train", "--out", str(moved), "--resume", "--method", "matching", "--episodes", "70"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "--resume continues the run as it was configured" in text and "--method 'matching' (the run has 'protonet')" in text
    # the budget and the device may change; giving the run's own values is fine
    check_resume_options(moved, {"episodes": 70, "device": "cpu", "method": "protonet", "out": str(moved)})
    merged = resumed_config(TrainConfig(out=str(moved), episodes=70, device="cpu"))
    assert merged.out == str(moved) and merged.episodes == 70 and merged.image_size == 48
