"""A checkpoint's sidecar is not trusted: every value the run is rebuilt from is checked for type
and bounds when it is loaded, and a bad one is a one-line error naming the file."""

from __future__ import annotations

import json
import shutil

import pytest

from medmeta.data.reading import MAX_IMAGE_SIZE, Preprocessing
from medmeta.errors import CheckpointError, MedmetaError
from medmeta.run import load_run


def _edit(run_dir, tmp_path, change):
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    meta = json.loads((target / "best.json").read_text())
    change(meta)
    (target / "best.json").write_text(json.dumps(meta))
    return target


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["calibration"].update(temperature=-1), "temperature must be a positive finite"),
        (lambda m: m["calibration"].update(temperature=0), "temperature must be a positive finite"),
        (lambda m: m["calibration"].update(temperature="1.2"), "must be a number"),
        (lambda m: m["calibration"]["conformal"].update(threshold="high"), "conformal"),
        (lambda m: m.update(format_version="1"), "format_version '1' is not an integer"),
        (lambda m: m.pop("preprocessing"), "invalid preprocessing record"),
        (lambda m: m["preprocessing"].update(image_size=20000), f"image_size must be an integer from 2 to {MAX_IMAGE_SIZE}"),
        (lambda m: m["preprocessing"].update(image_size="sixty"), "image_size must be an integer"),
        (lambda m: m["preprocessing"].update(channels=2), "channels must be 1 or 3"),
        (lambda m: m["preprocessing"].update(percentiles=[99, 1]), "percentiles"),
        (lambda m: m["preprocessing"].update(ct_window=[40, -1]), "ct_window"),
    ],
)
def test_a_forged_sidecar_is_refused_on_loading(trained_run, tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message) as excinfo:
        load_run(_edit(trained_run, tmp_path, change), device="cpu")
    assert "best.json" in str(excinfo.value)


def test_preprocessing_round_trips_and_checks_its_own_values():
    p = Preprocessing(image_size=48, channels=1)
    assert Preprocessing.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(MedmetaError, match="image_size"):
        Preprocessing(image_size=MAX_IMAGE_SIZE + 1)
    with pytest.raises(MedmetaError, match="mapping"):
        Preprocessing.from_dict(None)


def test_training_refuses_the_sizes_a_checkpoint_could_not_load():
    from medmeta.training import TrainConfig
    from medmeta.training import checks

    assert checks.MAX_IMAGE_SIZE == MAX_IMAGE_SIZE
    with pytest.raises(MedmetaError, match="at most 1024"):
        TrainConfig(image_size=MAX_IMAGE_SIZE + 1).validate()
