"""The faster ways of reading and embedding a scan give what the slower ones gave, bit for bit.

- DICOM pixels taken from pydicom directly (:func:`~medmeta.data.reading._plain_dicom_pixels`)
  against MONAI's ``LoadImage`` with its ``PydicomReader``: every DICOM file pydicom bundles and
  files written here (signed, rescaled, MONOCHROME1, 8-bit, multi-frame), tensors and rejection
  reasons alike, for 2D and 3D readers.
- Robust percentile scaling through :func:`~medmeta.data.reading._order_statistics` (a histogram
  of whole-number pixels, else a partial sort), grayscale repeated to three channels after the
  scaling and the resize, MONAI's transforms without metadata: against MONAI's
  ``ScaleIntensityRangePercentiles`` and ``Resize`` on the repeated image.
- Max pooling without gradients (:func:`~medmeta.backbones.layers.strided_max`) against torch's
  kernel; with gradients, torch's kernel itself.
- Grayscale thumbnails stored as one channel; cases handed over by loader workers in groups.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import medmeta.data.reading as reading
from medmeta.backbones.conv4 import Conv4
from medmeta.backbones.layers import MaxPool, strided_max
from medmeta.data.reading import Preprocessing, ScanReader
from medmeta.errors import ScanReadError
from medmeta.pipeline import cases as cases_module
from medmeta.pipeline.cases import open_cases, stream_queries
from medmeta.reports.thumbnails import thumbnail_png

from conftest import SAMPLE_DATA
from test_reading import write_dicom

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- DICOM: pydicom directly against LoadImage ----------------------------------------------
def _outcome(reader: ScanReader, path: Path):
    try:
        return reader(path)
    except ScanReadError as exc:
        return exc.reason


def _same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a.shape == b.shape and torch.equal(a, b)


@pytest.fixture(scope="module")
def dicom_files(tmp_path_factory) -> list[Path]:
    """pydicom's bundled DICOM files (given a .dcm name where they have none) and written ones."""
    folder = tmp_path_factory.mktemp("dicom")
    files = []
    for i, path in enumerate(sorted(p for p in PYDICOM_FILES.rglob("*") if p.is_file())):
        if pydicom.misc.is_dicom(path):
            files.append(folder / f"bundled{i:03d}_{path.stem}.dcm")
            shutil.copyfile(path, files[-1])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (40, 36))
    files += [
        write_dicom(folder / "plain.dcm", image),
        write_dicom(folder / "signed.dcm", image - 2000, signed=True),
        write_dicom(folder / "rescaled.dcm", image, slope=0.37, intercept=-1024.5),
        write_dicom(folder / "slope_only.dcm", image, slope=2.5),
        write_dicom(folder / "ct.dcm", image - 1000, modality="CT", signed=True, slope=1.0, intercept=-24.0),
        write_dicom(folder / "mono1.dcm", image, photometric="MONOCHROME1"),
        write_dicom(folder / "frames.dcm", rng.integers(0, 900, (5, 20, 24))),
        write_dicom(folder / "ties.dcm", rng.integers(0, 3, (32, 32))),
        write_dicom(folder / "bits12.dcm", image, bits_stored=12),
    ]
    return files


@pytest.mark.parametrize(
    "settings",
    [
        dict(image_size=32, channels=3),
        dict(image_size=32, channels=1),
        dict(image_size=96, channels=3),  # enlarged
        dict(image_size=32, channels=3, intensity="ct"),
        dict(image_size=32, channels=1, intensity="mr"),
        dict(image_size=16, channels=1, spatial_dims=3),
    ],
)
def test_dicom_read_directly_equals_monai_loadimage(dicom_files, settings, monkeypatch):
    fast = ScanReader(Preprocessing(**settings))
    direct = []
    plain = reading._plain_dicom_pixels

    def counted(dataset):
        pixels = plain(dataset)
        direct.append(pixels is not None)
        return pixels

    monkeypatch.setattr(reading, "_plain_dicom_pixels", counted)
    got = {path: _outcome(fast, path) for path in dicom_files}
    # the code before the fast path: the header read alone, then every file through LoadImage
    monkeypatch.setattr(reading, "_read_whole_dicom", lambda path: None)
    monkeypatch.setattr(reading, "_plain_dicom_pixels", lambda dataset: None)
    slow = ScanReader(Preprocessing(**settings))
    expected = {path: _outcome(slow, path) for path in dicom_files}
    differ = [path.name for path in dicom_files if not _same(got[path], expected[path])]
    assert not differ
    read = sum(not isinstance(v, str) for v in got.values())
    assert read >= (8 if settings.get("spatial_dims") == 3 else 30)  # the comparison covers decoded scans...
    assert sum(direct) >= read - 3  # ...and nearly all of them were read directly


def test_a_segmentation_goes_through_monai(tmp_path):
    dataset = pydicom.Dataset()
    dataset.SegmentSequence = []
    assert reading._plain_dicom_pixels(dataset) is None


def test_undecodable_pixels_fall_back_to_monai():
    dataset = pydicom.Dataset()  # no pixel data at all
    assert reading._plain_dicom_pixels(dataset) is None


# -- robust percentiles ----------------------------------------------------------------------
def _monai_percentiles(array: np.ndarray) -> torch.Tensor:
    from monai.transforms import ScaleIntensityRangePercentiles

    scale = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    return torch.as_tensor(np.asarray(scale(torch.as_tensor(array))))


def _arrays():
    rng = np.random.default_rng(1)
    return {
        "uint16": rng.integers(0, 4096, (1, 50, 40)).astype(np.float32),
        "signed": rng.integers(-3000, 3000, (1, 33, 31)).astype(np.float32),
        "ties": rng.integers(0, 4, (1, 64, 64)).astype(np.float32),
        "fractions": rng.normal(0, 1, (1, 30, 30)).astype(np.float32),
        "wide_range": (rng.integers(0, 2, (1, 20, 20)) * 1e9 + rng.integers(0, 9, (1, 20, 20))).astype(np.float32),
        "rgb": rng.integers(0, 256, (3, 24, 24)).astype(np.float32),
        "big": rng.integers(0, 256, (1, 600, 600)).astype(np.float32),  # 3 x 360,000 values: numpy's percentile
    }


@pytest.mark.parametrize("name", list(_arrays()))
def test_robust_percentiles_equal_monai_on_the_repeated_image(name):
    array = _arrays()[name]
    repeat = 3 if array.shape[0] == 1 else 1
    reader = ScanReader(Preprocessing())
    got = torch.as_tensor(reader._robust_percentiles(array, repeat)).repeat(repeat, 1, 1)
    assert torch.equal(got, _monai_percentiles(np.repeat(array, repeat, axis=0)))


@pytest.mark.parametrize("name", ["uint16", "signed", "ties", "fractions", "wide_range"])
def test_order_statistics_equal_a_partial_sort(name):
    flat = _arrays()[name].reshape(-1)
    positions = [0, 1, 7, flat.size // 2, flat.size - 2, flat.size - 1]
    found = reading._order_statistics(flat, positions)
    expected = np.partition(flat, positions)
    assert {k: float(v) for k, v in found.items()} == {k: float(expected[k]) for k in positions}


@pytest.mark.parametrize("threads", [1, 2])  # loader workers read with one thread
@pytest.mark.parametrize("size", [16, 24, 80])  # shrunk, shrunk by a non-integer factor, enlarged
@pytest.mark.parametrize("name", ["uint16", "fractions", "rgb"])
def test_reader_equals_monai_transforms_with_metadata(name, size, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _compare_reader_with_monai(name, size)
    finally:
        torch.set_num_threads(before)


def _compare_reader_with_monai(name: str, size: int):
    from monai.transforms import Resize

    array = _arrays()[name]
    reader = ScanReader(Preprocessing(image_size=size, channels=3))
    expected = _monai_percentiles(np.repeat(array, 3 // array.shape[0], axis=0))
    mode = dict(mode="area") if min(array.shape[1:]) >= size else dict(mode="bilinear", align_corners=False)
    expected = torch.as_tensor(Resize(spatial_size=(size, size), **mode)(expected)).as_subclass(torch.Tensor).clamp(0, 1)
    assert torch.equal(reader(array), expected)


def test_monai_metadata_setting_is_restored_after_a_rejection():
    from monai.data import get_track_meta

    assert get_track_meta()
    with pytest.raises(ScanReadError, match="blank"):
        ScanReader(Preprocessing())(np.full((8, 8), 3.0))
    assert get_track_meta()


# -- max pooling -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spatial_dims, shape, kernel",
    [
        (2, (2, 3, 8, 8), 2),
        (2, (2, 3, 7, 9), 2),  # odd edges: partial windows
        (2, (1, 1, 1, 1), 2),
        (2, (2, 2, 7, 8), 3),
        (3, (2, 2, 6, 6, 6), 2),
        (3, (1, 2, 5, 6, 3), 2),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_strided_max_equals_torch_max_pooling(spatial_dims, shape, kernel, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    flat = x.view(-1)
    flat[0] = float("nan")
    flat[-1] = float("-inf")
    flat[2:6] = 0.25  # ties
    pool = F.max_pool2d if spatial_dims == 2 else F.max_pool3d
    expected = pool(x, kernel, ceil_mode=True)
    got = strided_max(x, kernel, spatial_dims)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(nan=7.0), expected.nan_to_num(nan=7.0))


def test_max_pool_takes_torch_kernel_when_a_gradient_is_needed():
    x = torch.zeros(1, 1, 4, 4)  # all ties: torch's kernel gives each window's gradient to one element
    x[0, 0, 3, 3] = 1.0
    x.requires_grad_(True)
    MaxPool(2)(x).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    F.max_pool2d(reference, 2, ceil_mode=True).sum().backward()
    assert torch.equal(x.grad, reference.grad)
    assert x.grad.sum() == 4 and (x.grad == 1).sum() == 4  # one element per window, not split


def test_conv4_embeds_the_same_with_and_without_gradients():
    torch.manual_seed(0)
    model = Conv4(in_channels=3).eval()
    images = torch.rand(5, 3, 42, 42)  # 42 -> 21 -> 11 -> 6 -> 3: odd edges on the way
    with torch.no_grad():
        fast = model(images)
    assert torch.equal(fast, model(images))


# -- thumbnails and worker groups --------------------------------------------------------------
def test_grayscale_thumbnail_is_one_channel():
    gray = torch.rand(1, 10, 12, generator=torch.Generator().manual_seed(0)).repeat(3, 1, 1)
    with Image.open(io.BytesIO(thumbnail_png(gray))) as image:
        assert image.mode == "L"
        assert np.array_equal(np.asarray(image), (gray[0].numpy() * 255).round().astype(np.uint8))
    colour = gray.clone()
    colour[1, 0, 0] = 1 - colour[1, 0, 0]
    with Image.open(io.BytesIO(thumbnail_png(colour))) as image:
        assert image.mode == "RGB"


@pytest.mark.parametrize(
    "n_cases, workers, scan_bytes, expected",
    [
        (10_000, 2, 3 * 64 * 64 * 4, 16),  # 48 KiB scans: the count cap
        (10_000, 2, 3 * 1024 * 1024 * 4, 1),  # 12 MiB scans: one at a time
        (10_000, 8, 64**3 * 4, 4),  # 1 MiB volumes: 4 MiB a group
        (20, 8, 100, 3),  # a small batch: every worker gets a group
        (1, 0, 100, 1),
    ],
)
def test_query_group_size(n_cases, workers, scan_bytes, expected):
    assert cases_module.query_group(n_cases, workers, scan_bytes) == expected


def test_groups_of_cases_from_workers_keep_order_and_rejections(tmp_path, monkeypatch):
    cases = tmp_path / "cases"
    shutil.copytree(SAMPLE_DATA / "cases", cases)
    queries = sorted((cases / "query").rglob("*.png"))
    (queries[4].parent / "broken.png").write_bytes(b"not an image")
    for i in range(3):  # a whole group of unreadable files
        (cases / "query" / f"zz_broken_{i}.png").write_bytes(b"junk")
    reader = ScanReader(Preprocessing(image_size=16))
    monkeypatch.setattr(cases_module, "QUERY_GROUP", 3)
    source = open_cases(cases, reader)
    assert len(source.query) == 34 and [p.name for p in source.query[-3:]] == [f"zz_broken_{i}.png" for i in range(3)]
    chunks = list(stream_queries(source, reader, chunk_cases=5, workers=2))  # groups of 3: the last is 1 case
    expected_images, expected_rejected = [], []
    for path in source.query:  # each file read on its own, here
        try:
            expected_images.append((source.relative(path), reader(path)))
        except ScanReadError as exc:
            expected_rejected.append((source.relative(path), exc.reason))
    assert [q.path for c in chunks for q in c] == [p for p, _ in expected_images]
    assert torch.equal(torch.stack([q.image for c in chunks for q in c]), torch.stack([im for _, im in expected_images]))
    assert source.rejected == expected_rejected and len(expected_rejected) == 4
