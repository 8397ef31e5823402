"""Decompression bombs: a scan whose header declares more pixels than the cap is refused before
it is decoded, whatever its format, and a batch holding one goes on."""

from __future__ import annotations

import resource
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medmeta.cli.main import app
from medmeta.data.reading import MAX_PIXELS, Preprocessing, ScanReader
from medmeta.errors import ScanReadError
from test_reading import write_dicom

SAMPLE_CASES = Path(__file__).resolve().parents[1] / "sample_data" / "cases"


def huge_png(path: Path) -> Path:
    Image.new("L", (9000, 9000)).save(path)  # 79 KB on disk, 81 million pixels decoded
    return path


def test_a_9000_square_png_is_refused_without_decoding(tmp_path):
    path = huge_png(tmp_path / "bomb.png")
    assert path.stat().st_size < 100_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ScanReadError, match="declares 81,000,000 pixels, more than the 50,000,000"):
        ScanReader(Preprocessing(image_size=32))(path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200  # decoding it would take about 4.5 GB


@pytest.mark.parametrize("fmt", ["dicom", "nifti", "png"])
def test_the_cap_applies_to_every_format_and_is_configurable(tmp_path, fmt):
    pixels = np.tile(np.arange(16, dtype=np.uint16), (16, 1))
    if fmt == "dicom":
        path = write_dicom(tmp_path / "a.dcm", pixels)
    elif fmt == "nifti":
        path = tmp_path / "a.nii.gz"
        nibabel.save(nibabel.Nifti1Image(pixels.astype(np.float32), np.eye(4)), path)
    else:
        path = tmp_path / "a.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
    assert ScanReader(Preprocessing(image_size=16, channels=1), max_pixels=256)(path).shape == (1, 16, 16)
    with pytest.raises(ScanReadError, match="declares 256 pixels, more than the 255"):
        ScanReader(Preprocessing(image_size=16, channels=1), max_pixels=255)(path)
    assert MAX_PIXELS == 50_000_000


def test_a_bomb_in_a_batch_is_rejected_and_the_batch_goes_on(trained_run, tmp_path):
    cases = tmp_path / "cases"
    shutil.copytree(SAMPLE_CASES, cases)
    huge_png(cases / "query" / "bomb.png")
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["adapt", "--checkpoint", str(trained_run), "--cases", str(cases), "--out", str(out), "--no-stability"])
    assert result.exit_code == 0, result.output
    rejected = (out / "rejected.csv").read_text()
    assert "query/bomb.png" in rejected and "more than the 50,000,000" in rejected
    assert len((out / "predictions.csv").read_text().splitlines()) == 31
