"""ScanReader, Preprocessing and scan_format on real DICOM / NIfTI / PNG / JPEG files.

Real files come from the pip packages (pydicom's and nibabel's bundled test data), from images
written here with Pillow / pydicom / nibabel, and, when present, from ``../shared/datasets``.
Exact expectations are computed independently in the tests (HU windowing, robust percentile
scaling, luminance) on inputs small enough that no resampling happens (image_size == native).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medmeta.data.reading import Preprocessing, ScanReader, is_rejection_reason, scan_format
from medmeta.errors import MedmetaError, ScanReadError
from conftest import require_dataset as shared

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"
LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float64)

# pydicom notes that SC_rgb_jpeg.dcm declares explicit VR but is implicit: expected, harmless
pytestmark = pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")


# -- helpers ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def reader(image_size: int = 32, channels: int = 3, ct_window: tuple[float, float] = (40.0, 400.0)) -> ScanReader:
    return ScanReader(Preprocessing(image_size=image_size, channels=channels, ct_window=ct_window))




def pydicom_file(name: str) -> Path:
    path = PYDICOM_FILES / name
    if not path.is_file():
        pytest.skip(f"pydicom test file not bundled in this pydicom version: {path}")
    return path


def nibabel_file(name: str) -> Path:
    path = NIBABEL_DATA / name
    if not path.is_file():
        pytest.skip(f"nibabel test file not bundled in this nibabel version: {path}")
    return path


def robust(values: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Reference robust min-max: percentiles over the whole array, clipped to [0, 1]."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(values, [lower, upper])
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    modality: str = "OT",
    slope: float | None = None,
    intercept: float | None = None,
    signed: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    bits_stored: int = 16,
    pixel_data: bytes | None = None,
) -> Path:
    """A single- or multi-frame grayscale DICOM written with pydicom: ``pixels`` uncompressed, or
    ``pixel_data`` (encapsulated, e.g. compressed frames) in ``transfer_syntax`` with ``pixels``
    giving only the shape."""
    sop_class = CTImageStorage if modality == "CT" else SecondaryCaptureImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    if pixels.ndim == 3:
        ds.NumberOfFrames = int(pixels.shape[0])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if pixel_data is None:
        ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    else:
        ds.PixelData = pixel_data
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def marker_image(rows: int = 16, columns: int = 16, high: int = 255) -> np.ndarray:
    """Black image with a bright top row and one bright pixel at (5, 2): orientation-asymmetric.

    More than 0.5% of the pixels are at 0 and at ``high``, so the robust percentiles are exactly
    0 and ``high`` and the expected output is ``image / high``.
    """
    image = np.zeros((rows, columns), dtype=np.uint16 if high > 255 else np.uint8)
    image[0, :] = high
    image[5, 2] = high
    return image


# -- real files gathered once ---------------------------------------------------------------
@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """Small PNG/JPEG files written with Pillow (seeded)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    gray = (rng.random((40, 30)) * 255).astype(np.uint8)
    rgb = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
    rgba = np.dstack([rgb, (rng.random((24, 24)) * 255).astype(np.uint8)])
    files = {
        "gray_png": folder / "gray.png",
        "rgb_png": folder / "rgb.png",
        "rgba_png": folder / "rgba.png",
        "rgb_jpg": folder / "rgb.jpg",
    }
    Image.fromarray(gray).save(files["gray_png"])
    Image.fromarray(rgb).save(files["rgb_png"])
    Image.fromarray(rgba, mode="RGBA").save(files["rgba_png"])
    Image.fromarray(rgb).save(files["rgb_jpg"], quality=95)
    return files


def resolve_source(name: str, written: dict[str, Path]) -> Path:
    if name in written:
        return written[name]
    if name.endswith(".dcm"):
        return pydicom_file(name)
    return nibabel_file(name)


# -- scan_format -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected",
    [
        ("scan.dcm", "dicom"),
        ("SCAN.DICOM", "dicom"),
        ("brain.nii", "nifti"),
        ("brain.NII.GZ", "nifti"),
        ("x.png", "image"),
        ("x.JPG", "image"),
        ("x.jpeg", "image"),
        ("x.bmp", "image"),
        ("x.tif", "image"),
        ("x.tiff", "image"),
        ("metadata.csv", None),
        ("notes.txt", None),
        ("protocol.yaml", None),
        ("breastmnist.npz", None),
        ("movie.gif", None),
    ],
)
def test_scan_format_by_suffix(name, expected):
    # suffix decisions never touch the disk: the files need not exist
    assert scan_format(name) == expected


def test_scan_format_sniffs_dicom_preamble_without_suffix(tmp_path):
    dicom = tmp_path / "IM000001"
    shutil.copy(pydicom_file("CT_small.dcm"), dicom)
    other = tmp_path / "README"
    other.write_bytes(b"\0" * 200)
    short = tmp_path / "tiny"
    short.write_bytes(b"DICM")
    assert scan_format(dicom) == "dicom"
    assert scan_format(other) is None
    assert scan_format(short) is None
    assert scan_format(tmp_path / "does-not-exist") is None


def test_extensionless_dicom_reads_like_the_dcm(tmp_path):
    dicom = tmp_path / "IM000001"
    shutil.copy(pydicom_file("CT_small.dcm"), dicom)
    r = reader(64, 1)
    torch.testing.assert_close(r(dicom), r(pydicom_file("CT_small.dcm")), rtol=0, atol=0)


# -- Preprocessing ---------------------------------------------------------------------------
def test_preprocessing_round_trips_through_dict():
    p = Preprocessing(image_size=96, channels=1, ct_window=(-600.0, 1500.0), percentiles=(1.0, 99.0))
    data = p.to_dict()
    assert data == {"image_size": 96, "channels": 1, "ct_window": (-600.0, 1500.0), "percentiles": (1.0, 99.0)}
    assert Preprocessing.from_dict(data) == p


def test_preprocessing_from_dict_fills_defaults_and_converts_types():
    # e.g. a checkpoint written as JSON: lists instead of tuples, numbers as strings
    p = Preprocessing.from_dict({"image_size": "48", "channels": "3"})
    assert p == Preprocessing(image_size=48, channels=3, ct_window=(40.0, 400.0), percentiles=(0.5, 99.5))
    q = Preprocessing.from_dict({"image_size": 32, "channels": 1, "ct_window": [50, 350], "percentiles": [2, 98]})
    assert q.ct_window == (50, 350) and isinstance(q.ct_window, tuple)
    assert q.percentiles == (2, 98) and isinstance(q.percentiles, tuple)


# -- shapes, dtype, range on real files ------------------------------------------------------
# [kwargs, source, expected_shape]
SHAPE_CASES = [
    [{"image_size": 32, "channels": 3}, "CT_small.dcm", (3, 32, 32)],
    [{"image_size": 16, "channels": 1}, "CT_small.dcm", (1, 16, 16)],
    [{"image_size": 128, "channels": 1}, "CT_small.dcm", (1, 128, 128)],
    [{"image_size": 48, "channels": 3}, "MR_small.dcm", (3, 48, 48)],
    [{"image_size": 96, "channels": 1}, "MR_small.dcm", (1, 96, 96)],  # upsampling 64 -> 96
    [{"image_size": 64, "channels": 1}, "JPEG2000.dcm", (1, 64, 64)],
    [{"image_size": 32, "channels": 3}, "SC_rgb_jpeg.dcm", (3, 32, 32)],
    [{"image_size": 32, "channels": 1}, "SC_rgb_jpeg.dcm", (1, 32, 32)],
    [{"image_size": 16, "channels": 3}, "gray_png", (3, 16, 16)],
    [{"image_size": 64, "channels": 1}, "gray_png", (1, 64, 64)],
    [{"image_size": 24, "channels": 3}, "rgb_png", (3, 24, 24)],
    [{"image_size": 8, "channels": 1}, "rgb_png", (1, 8, 8)],
    [{"image_size": 12, "channels": 3}, "rgba_png", (3, 12, 12)],
    [{"image_size": 12, "channels": 1}, "rgba_png", (1, 12, 12)],
    [{"image_size": 32, "channels": 3}, "rgb_jpg", (3, 32, 32)],
]


@pytest.mark.parametrize("kwargs, source, expected_shape", SHAPE_CASES)
def test_output_shape_dtype_and_range(kwargs, source, expected_shape, written):
    out = reader(**kwargs)(resolve_source(source, written))
    assert tuple(out.shape) == expected_shape
    assert out.dtype == torch.float32
    assert out.is_contiguous()
    assert torch.isfinite(out).all()
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.max()) > float(out.min())  # real content, not a blank


def test_grayscale_is_repeated_to_three_identical_channels(written):
    out = reader(40, 3)(written["gray_png"])
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    torch.testing.assert_close(out[0], out[2], rtol=0, atol=0)
    one = reader(40, 1)(written["gray_png"])
    torch.testing.assert_close(out[:1], one, rtol=0, atol=0)


# -- exact intensities -------------------------------------------------------------------------
@pytest.mark.parametrize("window", [(40.0, 400.0), (0.0, 2000.0), (100.0, 100.0), (-600.0, 1500.0)])
def test_ct_small_native_size_is_exactly_hu_windowed(window):
    path = pydicom_file("CT_small.dcm")
    header = pydicom.dcmread(path)
    assert header.Modality == "CT" and (header.Rows, header.Columns) == (128, 128)
    hu = header.pixel_array.astype(np.float64) * float(header.RescaleSlope) + float(header.RescaleIntercept)
    level, width = window
    expected = np.clip((hu - (level - width / 2)) / width, 0.0, 1.0)
    out = reader(128, 1, window)(path)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-4, rtol=0)
    # the known pixel at the top-left corner, spelled out
    assert abs(float(out[0, 0, 0]) - float(np.clip((hu[0, 0] - (level - width / 2)) / width, 0, 1))) < 1e-4


def test_ct_window_uses_slope_and_intercept_not_percentiles(tmp_path):
    # stored values 0..63 with slope 10 and intercept -400 -> HU -400..230 over an 8x8 CT
    stored = np.arange(64, dtype=np.int16).reshape(8, 8)
    path = write_dicom(tmp_path / "ct.dcm", stored, modality="CT", slope=10, intercept=-400, signed=True)
    out = reader(8, 1, (40.0, 400.0))(path)[0].numpy()
    hu = stored.astype(np.float64) * 10 - 400
    expected = np.clip((hu + 160.0) / 400.0, 0.0, 1.0)
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)
    assert out[0, 0] == 0.0  # -400 HU is below the window: clipped, not rescaled
    assert abs(out[3, 0] - (-160.0 + 160.0) / 400.0) < 1e-6  # stored 24 -> -160 HU, the window's floor
    assert abs(out[7, 7] - (230.0 + 160.0) / 400.0) < 1e-6  # stored 63 -> 230 HU


def test_non_ct_dicom_uses_robust_percentiles(tmp_path):
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8) * 7
    path = write_dicom(tmp_path / "mr.dcm", stored, modality="MR")
    out = reader(8, 1)(path)[0].numpy()
    np.testing.assert_allclose(out, robust(stored), atol=1e-6, rtol=0)


def test_mr_small_native_size_is_robust_scaled_pixel_array():
    path = pydicom_file("MR_small.dcm")
    pixels = pydicom.dcmread(path).pixel_array
    out = reader(pixels.shape[0], 1)(path)[0].numpy()
    np.testing.assert_allclose(out, robust(pixels), atol=1e-5, rtol=0)


def test_rgb_png_three_channels_are_jointly_robust_scaled(written):
    rgb = np.asarray(Image.open(written["rgb_png"]))
    out = reader(24, 3)(written["rgb_png"]).numpy()
    np.testing.assert_allclose(out, robust(rgb).transpose(2, 0, 1), atol=1e-5, rtol=0)
    assert np.abs(out[0] - out[1]).max() > 0.1  # colour survives


def test_rgb_png_one_channel_is_luminance(written):
    rgb = np.asarray(Image.open(written["rgb_png"])).astype(np.float64)
    out = reader(24, 1)(written["rgb_png"])[0].numpy()
    np.testing.assert_allclose(out, robust(rgb @ LUMINANCE), atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_rgba_alpha_is_dropped(channels, written):
    # rgba.png holds the very same RGB values as rgb.png plus a random alpha plane
    rgba = np.asarray(Image.open(written["rgba_png"]))
    np.testing.assert_array_equal(rgba[..., :3], np.asarray(Image.open(written["rgb_png"])))
    r = reader(24, channels)
    torch.testing.assert_close(r(written["rgba_png"]), r(written["rgb_png"]), rtol=0, atol=0)


# -- orientation -----------------------------------------------------------------------------
def _check_marker(out: torch.Tensor) -> None:
    """``out`` is the 16x16 marker image read at native size."""
    expected = marker_image().astype(np.float32) / 255.0
    for channel in out:
        np.testing.assert_allclose(channel.numpy(), expected, atol=1e-6, rtol=0)
    assert float(out[0, 0, :].min()) == pytest.approx(1.0)  # bright row on top
    assert float(out[0, -1, :].max()) == pytest.approx(0.0)  # not at the bottom
    assert float(out[0, 5, 2]) == pytest.approx(1.0) and float(out[0, 2, 5]) == pytest.approx(0.0)  # not transposed


@pytest.mark.parametrize("channels", [1, 3])
def test_png_bright_top_row_stays_on_top(tmp_path, channels):
    path = tmp_path / "marker.png"
    Image.fromarray(marker_image()).save(path)
    _check_marker(reader(16, channels)(path))


def test_rgb_png_bright_top_row_stays_on_top(tmp_path):
    path = tmp_path / "marker_rgb.png"
    Image.fromarray(np.repeat(marker_image()[..., None], 3, axis=2)).save(path)
    _check_marker(reader(16, 3)(path))


@pytest.mark.parametrize("channels", [1, 3])
def test_dicom_bright_top_row_stays_on_top(tmp_path, channels):
    image = marker_image(high=1000)
    path = write_dicom(tmp_path / "marker.dcm", image)
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, image)  # written as intended
    _check_marker(reader(16, channels)(path))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_2d_stored_as_columns_by_rows_comes_back_in_display_layout(tmp_path, suffix):
    image = marker_image().astype(np.float32)
    path = tmp_path / f"marker{suffix}"
    nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(image.T), np.eye(4)), path)  # x = columns, y = rows
    _check_marker(reader(16, 1)(path))


def test_non_square_png_keeps_its_top_row_on_top(tmp_path):
    # 8 rows x 24 columns, stretched to a square: the top row must still be the brightest
    image = np.zeros((8, 24), dtype=np.uint8)
    image[0, :] = 255
    image[:, 0] = 128  # a dim left column, to catch a transpose
    path = tmp_path / "wide.png"
    Image.fromarray(image).save(path)
    out = reader(16, 1)(path)[0]
    row_means = out.mean(dim=1)
    assert int(row_means.argmax()) == 0
    assert float(row_means[0]) > 0.5 > float(row_means[-1])
    assert float(out[8:, 0].mean()) > float(out[8:, -1].mean())  # dim column stays on the left


# -- MONOCHROME1 -----------------------------------------------------------------------------
def test_monochrome1_is_inverted(tmp_path):
    image = marker_image(high=1000)
    mono2 = write_dicom(tmp_path / "mono2.dcm", image, photometric="MONOCHROME2")
    mono1 = write_dicom(tmp_path / "mono1.dcm", image, photometric="MONOCHROME1")
    r = reader(16, 1)
    out1, out2 = r(mono1), r(mono2)
    torch.testing.assert_close(out1, 1.0 - out2, rtol=0, atol=1e-6)
    assert float(out1[0, 0, 0]) == pytest.approx(0.0)  # stored max (bright in MONOCHROME2) is dark
    assert float(out1[0, 10, 10]) == pytest.approx(1.0)


def test_real_monochrome1_chest_xray_is_the_inverse_of_its_monochrome2_twin():
    folder = shared("chest-xray-samples")
    mono1 = folder / "Fake_MONOHR1.dcm"
    twins = [p for p in sorted(folder.glob("*.dcm")) if p != mono1]
    if not mono1.is_file() or not twins:
        pytest.skip(f"expected Fake_MONOHR1.dcm and a MONOCHROME2 twin in {folder}")
    mono2 = twins[0]
    h1 = pydicom.dcmread(mono1, stop_before_pixels=True)
    h2 = pydicom.dcmread(mono2, stop_before_pixels=True)
    assert (h1.PhotometricInterpretation, h2.PhotometricInterpretation) == ("MONOCHROME1", "MONOCHROME2")
    # same stored pixels; native 1024 so that no resampling is involved
    r = reader(int(h1.Rows), 1)
    torch.testing.assert_close(r(mono1), 1.0 - r(mono2), rtol=0, atol=1e-5)


# -- volumes are not images: refused, never sliced (tests/test_volumes.py reads them whole) ----
def test_3d_nifti_is_refused_by_a_2d_reader_with_its_shape(tmp_path):
    volume = np.zeros((12, 10, 5), dtype=np.float32)
    volume[:, :, 2] = marker_image(rows=10, columns=12).astype(np.float32).T
    path = tmp_path / "volume.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), path)
    with pytest.raises(ScanReadError, match=r"a volume of shape \(12, 10, 5\), but this model reads 2D images"):
        reader(10, 1)(path)


def test_a_single_slice_nifti_is_an_image(tmp_path):
    image = marker_image(rows=10, columns=12).astype(np.float32)
    path = tmp_path / "slice.nii.gz"
    nibabel.save(nibabel.Nifti1Image(image.T[:, :, None], np.eye(4)), path)
    r = reader(10, 1)
    torch.testing.assert_close(r(path), r(image), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz"])
def test_real_nibabel_volumes_are_refused_by_a_2d_reader(name):
    with pytest.raises(ScanReadError, match="but this model reads 2D images") as caught:
        reader(32, 3)(nibabel_file(name))
    assert is_rejection_reason(caught.value.reason)


def test_multiframe_dicom_is_refused_by_a_2d_reader(tmp_path):
    frames = np.zeros((3, 8, 8), dtype=np.uint16)
    frames[1] = marker_image(8, 8, high=1000)
    path = write_dicom(tmp_path / "multiframe.dcm", frames)
    with pytest.raises(ScanReadError, match=r"a volume of shape \(3, 8, 8\), but this model reads 2D images"):
        reader(8, 1)(path)


def test_rgb_dicom_keeps_its_colour():
    path = pydicom_file("SC_rgb_jpeg.dcm")
    pixels = pydicom.dcmread(path).pixel_array
    assert pixels.shape == (256, 256, 3)
    r = reader(256, 3)
    torch.testing.assert_close(r(path), r(pixels), rtol=0, atol=1e-5)


def test_palette_png_is_read_as_its_colours(tmp_path):
    indices = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([255 - i for i in range(256) for _ in range(3)])  # index i shows grey 255 - i
    path = tmp_path / "palette.png"
    image.save(path)
    out = reader(16, 1)(path)[0].numpy()
    np.testing.assert_allclose(out, robust(255 - indices.astype(np.float64)), atol=1e-5)


def test_downsampling_does_not_darken_the_border():
    image = np.zeros((256, 256), dtype=np.float32)
    image[:, 128:] = 1.0  # right half white up to the border
    out = reader(16, 1)(image)[0]
    assert float(out[:, 10:].min()) > 0.98


# -- in-memory arrays ------------------------------------------------------------------------
# [kwargs, input_shape, expected_shape]
ARRAY_CASES = [
    [{"image_size": 16, "channels": 3}, (20, 30), (3, 16, 16)],
    [{"image_size": 16, "channels": 1}, (20, 30), (1, 16, 16)],
    [{"image_size": 32, "channels": 1}, (28, 28), (1, 32, 32)],
    [{"image_size": 12, "channels": 3}, (20, 30, 3), (3, 12, 12)],
    [{"image_size": 12, "channels": 1}, (20, 30, 3), (1, 12, 12)],
    [{"image_size": 12, "channels": 3}, (20, 30, 4), (3, 12, 12)],
    [{"image_size": 12, "channels": 3}, (3, 20, 30), (3, 12, 12)],
    [{"image_size": 12, "channels": 1}, (1, 20, 30), (1, 12, 12)],
]


@pytest.mark.parametrize("kwargs, input_shape, expected_shape", ARRAY_CASES)
def test_array_shapes(kwargs, input_shape, expected_shape):
    array = np.random.default_rng(0).random(input_shape) * 255
    out = reader(**kwargs)(array)
    assert tuple(out.shape) == expected_shape
    assert out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_gray_array_equals_the_same_png_on_disk(written):
    gray = np.asarray(Image.open(written["gray_png"]))
    assert gray.shape == (40, 30)
    r = reader(20, 3)
    torch.testing.assert_close(r(gray), r(written["gray_png"]), rtol=0, atol=0)


def test_rgb_array_equals_the_same_png_on_disk(written):
    rgb = np.asarray(Image.open(written["rgb_png"]))
    assert rgb.shape == (24, 24, 3)
    for channels in (1, 3):
        r = reader(24, channels)
        torch.testing.assert_close(r(rgb), r(written["rgb_png"]), rtol=0, atol=1e-6)


def test_array_exact_values_at_native_size():
    array = np.arange(36, dtype=np.float64).reshape(6, 6) ** 2
    out = reader(6, 1)(array)[0].numpy()
    np.testing.assert_allclose(out, robust(array), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "array, reason",
    [
        (np.full((8, 8), 3.0), "blank image (constant intensity)"),
        (np.where(np.eye(8) > 0, np.nan, 1.0), "NaN or infinite"),
        (np.where(np.eye(8) > 0, np.inf, 1.0), "NaN or infinite"),
        (np.zeros((2, 2, 2, 2)), "expected a 2D image array, got shape (2, 2, 2, 2)"),
        (np.arange(8.0)[None], "empty or degenerate image"),
        (np.zeros((0, 5)), "empty or degenerate image"),
    ],
)
def test_bad_arrays_raise_scan_read_error_with_the_given_name(array, reason):
    with pytest.raises(ScanReadError) as excinfo:
        reader(8, 1)(array, name="case-42")
    assert excinfo.value.path == "case-42"
    assert reason in excinfo.value.reason
    assert str(excinfo.value).startswith("case-42: ")


def test_bad_array_without_name_is_labelled_array():
    with pytest.raises(ScanReadError, match=r"^<array>: blank image"):
        reader(8, 1)(np.zeros((4, 4)))


def test_unsupported_channel_count_is_refused_when_configured():
    from medmeta.errors import MedmetaError

    with pytest.raises(MedmetaError, match="channels must be 1 or 3, got 2"):
        Preprocessing(image_size=8, channels=2)


# -- unreadable files ------------------------------------------------------------------------
def _random_bytes(path: Path, n: int = 4096) -> Path:
    path.write_bytes(np.random.default_rng(3).integers(0, 256, n, dtype=np.uint8).tobytes())
    return path


def _truncated_copy(source: Path, target: Path, keep: float = 0.6) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def _case_unsupported(tmp_path):
    path = tmp_path / "scan.gif"
    Image.fromarray(marker_image()).save(path)
    return path, "unsupported file type"


def _case_missing(tmp_path):
    return tmp_path / "no such scan.png", "file not found"


def _case_missing_directory(tmp_path):
    path = tmp_path / "a folder.png"
    path.mkdir()
    return path, "file not found"


def _case_random_dcm(tmp_path):
    return _random_bytes(tmp_path / "corrupt.dcm"), "not a DICOM file (the 'DICM' prefix or the file meta header is missing)"


def _case_empty_dcm(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    return path, "not a DICOM file (the 'DICM' prefix or the file meta header is missing)"


def _case_truncated_dcm(tmp_path):
    return _truncated_copy(pydicom_file("CT_small.dcm"), tmp_path / "truncated.dcm", keep=0.7), "PixelData (7FE0,0010) does not hold the pixels"


def _case_random_png(tmp_path):
    return _random_bytes(tmp_path / "corrupt.png"), "not a PNG/JPEG/BMP/TIFF image (content not recognised)"


def _case_truncated_png(tmp_path):
    source = tmp_path / "whole.png"
    Image.fromarray((np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8)).save(source)
    return _truncated_copy(source, tmp_path / "truncated.png", keep=0.5), "the image file is truncated or corrupt"


def _case_random_jpg(tmp_path):
    return _random_bytes(tmp_path / "corrupt.jpg"), "not a PNG/JPEG/BMP/TIFF image (content not recognised)"


def _case_random_nifti(tmp_path):
    return _random_bytes(tmp_path / "corrupt.nii"), "not a NIfTI file (header not recognised)"


def _case_constant_png(tmp_path):
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((16, 16), 90, dtype=np.uint8)).save(path)
    return path, "blank image (constant intensity)"


def _case_constant_dicom(tmp_path):
    return write_dicom(tmp_path / "blank.dcm", np.full((8, 8), 500, dtype=np.uint16)), "blank image (constant intensity)"


def _case_one_pixel_png(tmp_path):
    path = tmp_path / "dot.png"
    Image.fromarray(np.array([[10, 200]], dtype=np.uint8)).save(path)
    return path, "empty or degenerate image"


@pytest.mark.parametrize(
    "make_case",
    [
        _case_unsupported,
        _case_missing,
        _case_missing_directory,
        _case_random_dcm,
        _case_empty_dcm,
        _case_truncated_dcm,
        _case_random_png,
        _case_truncated_png,
        _case_random_jpg,
        _case_random_nifti,
        _case_constant_png,
        _case_constant_dicom,
        _case_one_pixel_png,
    ],
    ids=lambda f: f.__name__.removeprefix("_case_"),
)
def test_unreadable_files_raise_scan_read_error_naming_the_file(make_case, tmp_path):
    path, reason = make_case(tmp_path)
    with pytest.raises(ScanReadError) as excinfo:
        reader(16, 3)(path)
    error = excinfo.value
    assert isinstance(error, MedmetaError)
    assert error.path == str(path)
    assert path.name in str(error)
    assert reason in error.reason
    assert str(error) == f"{path}: {error.reason}"
    assert "\n" not in str(error)  # one clear line
    assert is_rejection_reason(error.reason)  # fixed wording, never a decoder's message


def test_reader_accepts_str_paths(written):
    r = reader(16, 1)
    torch.testing.assert_close(r(str(written["gray_png"])), r(written["gray_png"]), rtol=0, atol=0)


# -- shared real datasets --------------------------------------------------------------------
def test_isic9_jpeg_in_a_folder_with_spaces():
    folder = shared("isic9", "Train", "basal cell carcinoma")
    jpeg = next((p for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg")), None)
    if jpeg is None:
        pytest.skip(f"no JPEG in {folder}")
    assert " " in str(jpeg.parent.name)
    colour = reader(64, 3)(jpeg)
    assert tuple(colour.shape) == (3, 64, 64) and colour.dtype == torch.float32
    assert 0.0 <= float(colour.min()) and float(colour.max()) <= 1.0
    assert float((colour[0] - colour[2]).abs().mean()) > 0.01  # dermoscopy is in colour
    gray = reader(64, 1)(jpeg)
    assert tuple(gray.shape) == (1, 64, 64)
    # native 180x180: the single channel is the robust-scaled luminance of the JPEG's RGB
    rgb = np.asarray(Image.open(jpeg).convert("RGB")).astype(np.float64)
    native = reader(rgb.shape[0], 1)(jpeg)[0].numpy()
    np.testing.assert_allclose(native, robust(rgb @ LUMINANCE), atol=1e-5, rtol=0)


def test_chest_xray_dicom_and_png():
    folder = shared("chest-xray-samples")
    dicoms = sorted(folder.glob("*.dcm"))
    pngs = sorted(folder.glob("*.png"))
    if not dicoms or not pngs:
        pytest.skip(f"no DICOM or PNG in {folder}")
    for path in (dicoms[0], pngs[0]):
        for channels, size in ((1, 64), (3, 32)):
            out = reader(size, channels)(path)
            assert tuple(out.shape) == (channels, size, size)
            assert out.dtype == torch.float32
            assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
            assert float(out.std()) > 0.05


def test_chest_xray_dicom_copied_to_a_name_with_spaces_and_no_suffix(tmp_path):
    folder = shared("chest-xray-samples")
    dicoms = sorted(p for p in folder.glob("*.dcm") if p.name != "Fake_MONOHR1.dcm")
    if not dicoms:
        pytest.skip(f"no MONOCHROME2 DICOM in {folder}")
    target = tmp_path / "chest films" / "patient 1 image"
    target.parent.mkdir()
    shutil.copy(dicoms[0], target)
    r = reader(32, 1)
    torch.testing.assert_close(r(target), r(dicoms[0]), rtol=0, atol=0)


def test_reading_does_not_change_the_file(tmp_path):
    path = tmp_path / "x.dcm"
    shutil.copy(pydicom_file("CT_small.dcm"), path)
    before = path.read_bytes(), os.stat(path).st_mtime_ns
    reader(16, 1)(path)
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before
