"""Volumes: NIfTI files, DICOM series folders, multi-frame DICOM and 3D arrays read whole
(``Preprocessing.spatial_dims == 3``), and the 2D/3D mismatches refused with a clear reason.

Series are written here with pydicom from a known volume, in shuffled file order; expected
tensors are computed independently (robust percentiles, the CT window) on volumes small
enough that no resampling happens (``image_size`` == native).
"""

from __future__ import annotations

import random
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medmeta.data.reading import Preprocessing, ScanReader, is_rejection_reason
from medmeta.data.volumes import group_series, series_header, volume_sha256
from medmeta.errors import MedmetaError, ScanReadError

NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"


def reader3d(size: int = 8, channels: int = 1, **kwargs) -> ScanReader:
    return ScanReader(Preprocessing(image_size=size, channels=channels, spatial_dims=3, **kwargs))


def marker_volume(x: int = 8, y: int = 8, z: int = 8) -> np.ndarray:
    """Zeros with one bright voxel near the (0, 0, 0) corner and a mid-level voxel elsewhere:
    robust percentiles are exactly 0 and 200, so the expected output is ``volume / 200``."""
    volume = np.zeros((x, y, z), dtype=np.float32)
    volume[1, 2, z // 2] = 200.0
    volume[-2, -3, -1] = 100.0
    volume[0, 0, 0] = 200.0
    volume[0, 0, min(1, z - 1)] = 200.0
    volume[0, 1, 0] = 200.0
    return volume


def write_nifti(path: Path, volume: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4) if affine is None else affine), str(path))
    return path


#: RAS affine whose voxel axes already point to L, P, S (x and y flipped): orienting is a no-op
LPS_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_series(
    folder: Path,
    volume: np.ndarray,
    *,
    modality: str = "MR",
    spacing: tuple[float, float, float] = (0.8, 0.7, 2.5),
    positions: bool = True,
    instance_numbers: bool = True,
    series_uid: str | None = None,
    shuffle_seed: int = 0,
    intercept: float = 0.0,
) -> Path:
    """One file per slice ``volume[:, :, z]`` (rows = y, columns = x), axial, in LPS patient
    space, written under shuffled file names; InstanceNumber runs backwards (last slice 1), so
    only positions give the right order."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    n = volume.shape[2]
    names = list(range(n))
    random.Random(shuffle_seed).shuffle(names)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    for z in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, meta.MediaStorageSOPInstanceUID, modality
        ds.SeriesInstanceUID = uid
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (y), column spacing (x)
        if positions:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [0.0, 0.0, spacing[2] * z]
        if instance_numbers:
            ds.InstanceNumber = n - z
        ds.PixelData = np.ascontiguousarray(np.round(volume[:, :, z].T - intercept)).astype(np.int16).tobytes()
        ds.save_as(folder / f"{names[z]:03d}.dcm", enforce_file_format=True)
    return folder


# -- NIfTI --------------------------------------------------------------------------------------
# [preprocessing kwargs, stored shape (x, y, z), expected tensor shape]
SHAPES = [
    [{"size": 8}, (8, 8, 8), (1, 8, 8, 8)],
    [{"size": 8, "channels": 3}, (8, 8, 8), (3, 8, 8, 8)],
    [{"size": 6}, (12, 10, 8), (1, 6, 6, 6)],
    [{"size": 16}, (12, 10, 8), (1, 16, 16, 16)],
]


@pytest.mark.parametrize("kwargs, stored, expected", SHAPES)
def test_nifti_volume_shapes(tmp_path, kwargs, stored, expected):
    volume = np.random.default_rng(0).uniform(0, 100, stored).astype(np.float32)
    path = write_nifti(tmp_path / "v.nii.gz", volume, LPS_AFFINE)
    tensor, info = reader3d(**kwargs).read(path)
    assert tuple(tensor.shape) == expected and tensor.dtype == torch.float32
    assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    assert info.shape == stored and info.oriented


def test_nifti_in_lps_order_is_read_voxel_for_voxel(tmp_path):
    volume = marker_volume()
    path = write_nifti(tmp_path / "lps.nii.gz", volume, LPS_AFFINE)
    torch.testing.assert_close(reader3d()(path), torch.from_numpy(volume / 200.0)[None], rtol=0, atol=1e-6)


def test_nifti_in_ras_order_is_turned_to_lps(tmp_path):
    """An identity (RAS) affine: voxel x runs to the patient's right, y to anterior; the read
    volume has them reversed (towards L and P), z unchanged."""
    volume = marker_volume()
    path = write_nifti(tmp_path / "ras.nii.gz", volume, np.diag([2.0, 2.0, 3.0, 1.0]))
    tensor, info = reader3d().read(path)
    expected = torch.from_numpy(np.ascontiguousarray(volume[::-1, ::-1, :]) / 200.0)[None]
    torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    assert info.spacing == (2.0, 2.0, 3.0)


def test_spacing_resamples_then_crops_to_the_cube(tmp_path):
    """1 x 1 x 2 mm voxels resampled to 2 mm isotropic halve x and y; the cube is then padded
    (or cropped) about the centre, keeping the physical scale instead of stretching."""
    volume = np.zeros((16, 16, 8), dtype=np.float32)
    volume[4:12, 4:12, 2:6] = 100.0
    path = write_nifti(tmp_path / "aniso.nii.gz", volume, np.diag([-1.0, -1.0, 2.0, 1.0]))
    tensor = reader3d(size=12, spacing=(2.0, 2.0, 2.0))(path)
    assert tensor.shape == (1, 12, 12, 12)
    bright = (tensor[0] > 0.5).nonzero()
    extent = (bright.max(0).values - bright.min(0).values + 1).tolist()
    assert all(3 <= e <= 5 for e in extent)  # the 8 x 8 x 4 (16 x 16 x 8 mm) block is 4 x 4 x 4 voxels of 2 mm


def test_ct_intensity_windows_a_nifti_in_hounsfield_units(tmp_path):
    volume = np.full((8, 8, 8), -1000.0, dtype=np.float32)
    volume[2:6, 2:6, 2:6] = 40.0  # the window's level: 0.5
    volume[3, 3, 3] = 500.0  # above level + width / 2: 1.0
    path = write_nifti(tmp_path / "ct.nii.gz", volume, LPS_AFFINE)
    tensor = reader3d(intensity="ct")(path)
    expected = np.clip((volume - (40 - 200)) / 400, 0, 1)
    torch.testing.assert_close(tensor, torch.from_numpy(expected)[None].float(), rtol=0, atol=1e-6)


def test_mr_intensity_scales_by_the_foreground(tmp_path):
    """``mr``: percentiles of the non-zero voxels, so a mostly empty background does not set
    the scale (with every voxel counted, the 0.5th percentile would be 0)."""
    volume = np.zeros((8, 8, 8), dtype=np.float32)
    volume[2:6, 2:6, 2:6] = np.linspace(100, 300, 64, dtype=np.float32).reshape(4, 4, 4)
    path = write_nifti(tmp_path / "mr.nii.gz", volume, LPS_AFFINE)
    tensor = reader3d(intensity="mr", percentiles=(0.0, 100.0))(path)
    expected = np.clip((volume - 100.0) / 200.0, 0, 1)
    torch.testing.assert_close(tensor, torch.from_numpy(expected)[None].float(), rtol=0, atol=1e-6)


def test_4d_nifti_gives_its_first_volume(tmp_path):
    series = np.stack([marker_volume(), np.zeros((8, 8, 8), np.float32) + 7], axis=-1)
    path = write_nifti(tmp_path / "fmri.nii.gz", series, LPS_AFFINE)
    torch.testing.assert_close(reader3d()(path), torch.from_numpy(marker_volume() / 200.0)[None], rtol=0, atol=1e-6)


def test_real_nibabel_volumes_read_whole():
    for name in ("anatomical.nii", "example4d.nii.gz"):
        path = NIBABEL_DATA / name
        if not path.is_file():
            pytest.skip(f"nibabel test file not bundled in this nibabel version: {path}")
        tensor, info = reader3d(size=12).read(path)
        assert tensor.shape == (1, 12, 12, 12) and torch.isfinite(tensor).all() and float(tensor.std()) > 0.05
        assert len(info.shape) == 3 and min(info.shape) > 1


# -- DICOM series -------------------------------------------------------------------------------
def test_series_in_shuffled_files_reads_as_the_volume(tmp_path):
    volume = marker_volume()
    folder = write_series(tmp_path / "series", volume)
    lps = write_nifti(tmp_path / "same.nii.gz", volume, LPS_AFFINE)
    tensor, info = reader3d().read(folder)
    torch.testing.assert_close(tensor, reader3d()(lps), rtol=0, atol=1e-6)
    assert info.shape == (8, 8, 8) and info.spacing == pytest.approx((0.8, 0.7, 2.5)) and info.oriented


def test_series_order_does_not_depend_on_file_names(tmp_path):
    volume = marker_volume()
    a = reader3d()(write_series(tmp_path / "a", volume, shuffle_seed=1))
    b = reader3d()(write_series(tmp_path / "b", volume, shuffle_seed=2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_series_without_positions_is_ordered_by_instance_number(tmp_path):
    volume = marker_volume()
    folder = write_series(tmp_path / "numbers", volume, positions=False)
    header = series_header(folder)
    # InstanceNumber runs backwards (n - z): the first file in order holds the last slice
    assert len(header.files) == 8
    reversed_volume = np.ascontiguousarray(volume[:, :, ::-1])
    expected = reader3d()(write_nifti(tmp_path / "rev.nii.gz", reversed_volume, LPS_AFFINE))
    torch.testing.assert_close(reader3d()(folder), expected, rtol=0, atol=1e-6)


def test_ct_series_is_windowed_in_hounsfield_units(tmp_path):
    volume = np.full((8, 8, 8), -1000.0, dtype=np.float32)
    volume[2:6, 2:6, :] = 40.0
    folder = write_series(tmp_path / "ct", volume, modality="CT", intercept=-1024.0)
    tensor = reader3d()(folder)
    expected = np.clip((volume - (40 - 200)) / 400, 0, 1)
    torch.testing.assert_close(tensor, torch.from_numpy(expected)[None].float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda d: write_series(d, marker_volume(), series_uid="1.2.3") and write_series(d, marker_volume(z=4), series_uid="1.2.4", shuffle_seed=5), "series_mixed"),
        (lambda d: write_series(d, marker_volume(), positions=False, instance_numbers=False), "series_order"),
        (lambda d: d.mkdir(), "series_empty"),
    ],
    ids=["two-series", "no-order", "empty"],
)
def test_series_refusals_name_the_folder_and_the_reason(tmp_path, make, key):
    from medmeta.data.reading import rejection_reason_pattern

    folder = tmp_path / "bad"
    make(folder)
    with pytest.raises(ScanReadError) as caught:
        reader3d()(folder)
    assert caught.value.path == str(folder)
    assert rejection_reason_pattern(key).fullmatch(caught.value.reason), caught.value.reason


def test_series_with_slices_of_two_sizes_is_refused(tmp_path):
    folder = write_series(tmp_path / "sizes", marker_volume(), series_uid="1.2.5")
    write_series(tmp_path / "other", marker_volume(x=6), series_uid="1.2.5")
    next((tmp_path / "other").iterdir()).rename(folder / "extra.dcm")
    with pytest.raises(ScanReadError, match="differ in sizes"):
        reader3d()(folder)


def test_series_with_two_slices_at_one_position_is_refused(tmp_path):
    folder = write_series(tmp_path / "dup", marker_volume(z=3), series_uid="1.2.6")
    write_series(tmp_path / "again", marker_volume(z=3), series_uid="1.2.6")
    next((tmp_path / "again").iterdir()).rename(folder / "dup.dcm")
    with pytest.raises(ScanReadError, match="two slices at one position"):
        reader3d()(folder)


# -- limits: a volume is refused before it is decoded or resampled into more than a scan may hold
def test_a_nifti_declaring_too_many_voxels_is_refused_from_its_header(tmp_path):
    from medmeta.data.reading import rejection_reason_pattern

    path = write_nifti(tmp_path / "big.nii.gz", marker_volume(16, 16, 16))  # 4,096 voxels, a few hundred bytes
    with pytest.raises(ScanReadError) as caught:
        ScanReader(Preprocessing(image_size=8, channels=1, spatial_dims=3), max_pixels=4_000)(path)
    assert caught.value.path == str(path)
    assert rejection_reason_pattern("too_many_pixels").fullmatch(caught.value.reason)
    assert "declares 4,096 pixels, more than the 4,000" in caught.value.reason
    assert ScanReader(Preprocessing(image_size=8, channels=1, spatial_dims=3), max_pixels=4_096)(path).shape == (1, 8, 8, 8)


def test_resampling_to_a_fine_spacing_is_refused_when_it_would_exceed_the_cap(tmp_path):
    from medmeta.data.reading import rejection_reason_pattern

    path = write_nifti(tmp_path / "coarse.nii.gz", marker_volume(), np.diag([-2.0, -2.0, 2.0, 1.0]))  # 8^3 of 2 mm
    fine = Preprocessing(image_size=8, channels=1, spatial_dims=3, spacing=(0.25, 0.25, 0.25))  # would be 64^3 = 262,144
    with pytest.raises(ScanReadError) as caught:
        ScanReader(fine, max_pixels=100_000)(path)
    assert rejection_reason_pattern("resampled_too_large").fullmatch(caught.value.reason)
    assert "would give 262,144 voxels, more than the 100,000" in caught.value.reason
    assert ScanReader(fine, max_pixels=262_144)(path).shape == (1, 8, 8, 8)


def test_a_series_whose_files_hold_too_many_bytes_is_refused_unread(tmp_path):
    folder = write_series(tmp_path / "s", marker_volume())
    reader = reader3d()
    total = sum(f.stat().st_size for f in folder.iterdir())
    reader._volumes.max_bytes = total - 1
    with pytest.raises(ScanReadError) as caught:
        reader(folder)
    assert caught.value.path == str(folder) and f"holds {total:,} bytes" in caught.value.reason
    reader._volumes.max_bytes = total
    assert reader(folder).shape == (1, 8, 8, 8)


def test_series_sha256_changes_with_any_slice(tmp_path):
    folder = write_series(tmp_path / "s", marker_volume())
    before = volume_sha256(folder)
    assert before == volume_sha256(folder)
    victim = sorted(folder.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:-2] + b"\x01\x00")
    assert volume_sha256(folder) != before


def test_group_series_lists_each_series_folder_once(tmp_path):
    a = write_series(tmp_path / "a", marker_volume(z=3))
    nifti = write_nifti(tmp_path / "v.nii.gz", marker_volume())
    files = sorted(a.iterdir()) + [nifti]
    assert group_series(files) == [a, nifti]


def test_multiframe_dicom_is_a_volume_as_stored(tmp_path):
    from test_reading import write_dicom

    frames = np.zeros((6, 8, 8), dtype=np.uint16)
    frames[2, 1, 1] = frames[2, 1, 2] = frames[3, 1, 1] = 1000
    frames[5, 6, 6] = 500
    path = write_dicom(tmp_path / "multi.dcm", frames)
    tensor, info = ScanReader(Preprocessing(image_size=8, channels=1, spatial_dims=3)).read(path)
    assert tensor.shape == (1, 8, 8, 8) and not info.oriented and info.shape == (6, 8, 8)


# -- 2D and 3D do not mix ----------------------------------------------------------------------
def test_a_2d_reader_refuses_volumes_instead_of_slicing(tmp_path):
    from test_reading import write_dicom

    reader2d = ScanReader(Preprocessing(image_size=8, channels=1))
    nifti = write_nifti(tmp_path / "v.nii.gz", marker_volume())
    multi = write_dicom(tmp_path / "m.dcm", np.ones((3, 8, 8), dtype=np.uint16))
    for source in (nifti, multi, np.zeros((5, 8, 8))):
        with pytest.raises(ScanReadError, match="this model reads 2D images") as caught:
            reader2d(source)
        assert is_rejection_reason(caught.value.reason)


def test_a_3d_reader_refuses_images(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(png)
    flat = write_nifti(tmp_path / "flat.nii.gz", np.arange(64, dtype=np.float32).reshape(8, 8, 1))
    lone = write_series(tmp_path / "one", marker_volume(z=1))
    from test_reading import write_dicom

    slice_file = write_dicom(tmp_path / "slice.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8))
    for source in (png, slice_file, np.zeros((8, 8)), next(lone.iterdir())):
        with pytest.raises(ScanReadError, match="but this model reads volumes") as caught:
            reader3d()(source)
        assert is_rejection_reason(caught.value.reason)
    with pytest.raises(ScanReadError):
        reader3d()(flat)


def test_arrays_read_as_volumes(tmp_path):
    volume = marker_volume()
    tensor, info = reader3d().read(volume)
    torch.testing.assert_close(tensor, torch.from_numpy(volume / 200.0)[None], rtol=0, atol=1e-6)
    assert info.shape == (8, 8, 8) and not info.oriented


# -- preprocessing record --------------------------------------------------------------------
def test_volume_preprocessing_round_trips_and_2d_records_are_unchanged():
    p = Preprocessing(image_size=28, channels=1, spatial_dims=3, spacing=(1.0, 1.0, 2.0), intensity="ct")
    assert Preprocessing.from_dict(p.to_dict()) == p
    assert set(Preprocessing().to_dict()) == {"image_size", "channels", "ct_window", "percentiles"}


@pytest.mark.parametrize(
    "kwargs",
    [{"spatial_dims": 4}, {"spatial_dims": 3, "spacing": (1.0, 0.0, 1.0)}, {"spacing": (1.0, 1.0, 1.0)},
     {"intensity": "hu"}, {"spatial_dims": 3, "image_size": 512}],
)
def test_invalid_volume_preprocessing_is_refused(kwargs):
    with pytest.raises(MedmetaError):
        Preprocessing(**{"image_size": 28, "channels": 1, **kwargs})
