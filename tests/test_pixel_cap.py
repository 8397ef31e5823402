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


def deflate_bomb(path: Path, inflated_mb: int = 600) -> Path:
    """A deflated-transfer-syntax DICOM of about 0.6 MB whose dataset inflates to ``inflated_mb``
    MB (one private OB element of zeros). Before the check, pydicom inflated all of it at once:
    a 1 GB bomb took 2.1 GB and 18 s to read its header."""
    import struct
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from medmeta.data.reading import _deflated_dataset_offset

    small = write_dicom(path, np.arange(16, dtype=np.uint16).reshape(4, 4), transfer_syntax=DeflatedExplicitVRLittleEndian)
    start = _deflated_dataset_offset(small)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    size = inflated_mb << 20
    body = compressor.compress(struct.pack("<HH", 0x0011, 0x1010) + b"OB\0\0" + struct.pack("<I", size))
    zeros = bytes(1 << 20)
    body += b"".join(compressor.compress(zeros) for _ in range(inflated_mb)) + compressor.flush()
    path.write_bytes(small.read_bytes()[:start] + body)
    return path


def test_a_deflated_dicom_bomb_is_refused_without_inflating_it_into_memory(tmp_path):
    path = deflate_bomb(tmp_path / "deflated bomb.dcm")
    assert path.stat().st_size < 1_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reader = ScanReader(Preprocessing(image_size=16), max_pixels=10_000_000)  # so at most 80 MB + 64 MiB inflated
    with pytest.raises(ScanReadError, match="deflated DICOM data expands to more than 147,108,864 bytes"):
        reader(path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100


def test_a_deflated_dicom_within_the_cap_still_reads(tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    pixels = (np.arange(32 * 32).reshape(32, 32) % 97).astype(np.uint16)
    path = write_dicom(tmp_path / "deflated.dcm", pixels, transfer_syntax=DeflatedExplicitVRLittleEndian)
    plain = write_dicom(tmp_path / "plain.dcm", pixels)
    reader = ScanReader(Preprocessing(image_size=16, channels=1))
    assert torch_equal(reader(path), reader(plain))


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_a_file_larger_than_any_scan_within_the_cap_is_not_read(tmp_path):
    reader = ScanReader(Preprocessing(image_size=16), max_pixels=1000)  # at most 8,000 bytes + 64 MiB
    path = tmp_path / "huge.png"
    with open(path, "wb") as handle:
        handle.truncate(reader.max_bytes + 1)  # sparse: no disk used
    with pytest.raises(ScanReadError, match=r"holds 67,116,865 bytes, more than the 67,116,864 a scan"):
        reader(path)


def test_a_header_beyond_pils_own_bomb_limit_is_refused_with_its_declared_size(tmp_path):
    """PIL itself refuses to open a PNG declaring more than 2 x Image.MAX_IMAGE_PIXELS; the
    reason still says how many pixels the header declares (was: "cannot decode ... (DecompressionBombError)")."""
    from test_fuzz_cases import _png_with_size

    path = tmp_path / "declared.png"
    path.write_bytes(_png_with_size(60_000, 60_000))
    with pytest.raises(ScanReadError) as excinfo:
        ScanReader(Preprocessing(image_size=16))(path)
    assert excinfo.value.reason == "declares 3,600,000,000 pixels, more than the 50,000,000 a scan may have (not decoded)"
