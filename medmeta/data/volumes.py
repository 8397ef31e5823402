"""Reading volumes (NIfTI files, DICOM series folders, multi-frame DICOM files, 3D arrays).

:class:`~medmeta.data.reading.ScanReader` hands a scan here when its preprocessing has
``spatial_dims == 3``. Every volume leaves as ``(channels, size, size, size)`` float32 in
``[0, 1]``:

- **geometry**: NIfTI files and DICOM series are turned by MONAI's ``Orientation`` so that
  their voxel axes point to the patient's Left, Posterior and Superior (``LPS``, the DICOM
  patient coordinate system); with ``Preprocessing.spacing`` set they are resampled to that
  voxel spacing (mm, MONAI ``Spacing``) and centre-cropped or padded to the cube, otherwise the
  whole volume is resized to the cube. Arrays (MedMNIST) and multi-frame DICOM files carry no
  usable geometry and keep their stored axis order, ``(frames or depth, rows, columns)``.
- **DICOM series**: a folder holding the slices of one series. Every file's header is read
  first (no pixels): the folder must hold one SeriesInstanceUID, slices of one size and one
  orientation; slices are ordered by their position along the slice normal
  (ImagePositionPatient projected on the cross product of ImageOrientationPatient's row and
  column directions), or by InstanceNumber when positions are absent. MONAI's
  ``PydicomReader`` then decodes and stacks them in that order.
- **intensity**: as for images (:class:`~medmeta.data.reading.Preprocessing.intensity`).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medmeta.errors import ScanReadError

#: The voxel axes of an oriented volume: towards patient Left, Posterior, Superior.
ORIENTATION = "LPS"


@dataclass(frozen=True)
class VolumeInfo:
    """What reports say about a volume: its stored shape, voxel spacing (mm) when known, and
    whether its axes were oriented to :data:`ORIENTATION`."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None
    oriented: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "spacing_mm": None if self.spacing is None else [round(float(s), 4) for s in self.spacing],
            "orientation": ORIENTATION if self.oriented else "as stored",
        }


@dataclass(frozen=True)
class SeriesHeader:
    """The checked, ordered slices of one DICOM series folder."""

    files: tuple[Path, ...]
    is_ct: bool
    invert: bool
    pixels: int
    #: every slice has ImagePositionPatient and ImageOrientationPatient (else the volume is
    #: left in its stored axis order, not oriented)
    has_geometry: bool = True


def _dicom_files(folder: Path) -> list[Path]:
    """The DICOM files of ``folder`` (not hidden, not below it), as MONAI's reader finds them."""
    import pydicom

    return sorted(
        p for p in folder.iterdir()
        if not p.name.startswith(".") and p.is_file() and pydicom.misc.is_dicom(str(p))
    )


def series_header(folder: Path) -> SeriesHeader:
    """Read and check the headers of the series in ``folder`` and order its slices; every
    refusal is a :class:`ScanReadError` naming the folder and the reason."""
    from medmeta.data.reading import _dicom_header, _read_dicom_header, _reason

    files = _dicom_files(folder)
    if not files:
        raise ScanReadError(folder, _reason("series_empty"))
    headers = []
    for path in files:
        header = _read_dicom_header(path)
        _dicom_header(path, header)  # the same checks as a single file: pixel module, photometric
        headers.append(header)
    series = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        raise ScanReadError(folder, _reason("series_mixed", count=str(len(series))))
    sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(sizes) > 1:
        raise ScanReadError(folder, _reason("series_geometry", what="sizes (Rows x Columns)"))
    frames = [int(h.get("NumberOfFrames") or 1) for h in headers]
    if len(files) > 1 and max(frames) > 1:
        raise ScanReadError(folder, _reason("series_geometry", what="frame counts (a multi-frame file among slices)"))
    order, has_geometry = _slice_order(headers, folder)
    first = headers[0]
    rows, columns = sizes.pop()
    modality = str(first.get("Modality", "")).upper()
    return SeriesHeader(
        files=tuple(files[i] for i in order),
        is_ct=modality == "CT",
        invert=str(first.get("PhotometricInterpretation", "")) == "MONOCHROME1",
        pixels=rows * columns * sum(frames),
        has_geometry=has_geometry,
    )


def _slice_order(headers: list[Any], folder: Path) -> tuple[list[int], bool]:
    """Indices of ``headers`` from the first slice to the last along the slice normal; by
    InstanceNumber when positions are absent. And whether the slices carry their geometry."""
    from medmeta.data.reading import _reason

    if len(headers) == 1:
        return [0], True
    positions = [h.get("ImagePositionPatient") for h in headers]
    orientations = [h.get("ImageOrientationPatient") for h in headers]
    if all(p is not None and len(p) == 3 for p in positions) and all(o is not None and len(o) == 6 for o in orientations):
        cosines = np.asarray([[float(v) for v in o] for o in orientations])
        if not np.allclose(cosines, cosines[0], atol=1e-4):
            raise ScanReadError(folder, _reason("series_geometry", what="orientations (ImageOrientationPatient)"))
        normal = np.cross(cosines[0, :3], cosines[0, 3:])
        along = np.asarray([[float(v) for v in p] for p in positions]) @ normal
        if len(np.unique(np.round(along, 3))) < len(along):
            raise ScanReadError(folder, _reason("series_geometry", what="positions (two slices at one position)"))
        return [int(i) for i in np.argsort(along, kind="stable")], True
    numbers = [h.get("InstanceNumber") for h in headers]
    if any(n is None for n in numbers):
        raise ScanReadError(folder, _reason("series_order"))
    if len({int(n) for n in numbers}) < len(numbers):
        raise ScanReadError(folder, _reason("series_geometry", what="InstanceNumbers (two slices with one number)"))
    return [int(i) for i in np.argsort([int(n) for n in numbers], kind="stable")], False


def _series_reader_class():
    """MONAI's ``PydicomReader``, stacking a folder's slices in the order :func:`series_header`
    found (MONAI itself sorts by InstanceNumber alone): each slice's InstanceNumber is set, in
    memory only, to its rank in that order."""
    from monai.data import PydicomReader

    class SeriesReader(PydicomReader):
        order: tuple[str, ...] = ()

        def _combine_dicom_series(self, data, filenames):
            rank = {os.path.abspath(str(p)): i for i, p in enumerate(self.order)}
            for dataset, name in zip(data, filenames):
                dataset.InstanceNumber = rank.get(os.path.abspath(str(name)), len(rank))
            return super()._combine_dicom_series(data, filenames)

    return SeriesReader


def volume_sha256(path: Path) -> str:
    """The sha256 of a volume file, or of a series folder: of its DICOM files' names and
    sha256 digests, in name order (any slice changed, added or removed changes it)."""
    from medmeta.io import sha256_file

    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in _dicom_files(path):
        digest.update(f"{file.name}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def group_series(files: list[Path]) -> list[Path]:
    """The volumes among ``files``: every DICOM file stands for its folder (a series, or a
    folder holding one multi-frame file), listed once; any other file stands for itself."""
    from medmeta.data.reading import scan_format

    volumes: list[Path] = []
    seen: set[Path] = set()
    for path in files:
        volume = path.parent if scan_format(path) == "dicom" else path
        if volume not in seen:
            seen.add(volume)
            volumes.append(volume)
    return volumes


class VolumeReader:
    """Decodes a volume and brings it to the cube of :class:`Preprocessing` (see the module)."""

    def __init__(self, preprocessing: Any, max_pixels: int, frames: Callable[[Path], tuple[np.ndarray, bool]], max_bytes: int):
        """``frames`` decodes a multi-frame DICOM file to ``(1, frames, rows, columns)`` and
        whether it is CT (:meth:`~medmeta.data.reading.ScanReader.decode_frames`). A volume is
        refused before it is decoded when its header declares more than ``max_pixels`` voxels
        or its files hold more than ``max_bytes`` (a series: in all), and before it is resampled
        when resampling would give more than ``max_pixels``."""
        from monai.data import NibabelReader
        from monai.transforms import LoadImage, Orientation, Resize, ResizeWithPadOrCrop, Spacing

        p = self.preprocessing = preprocessing
        self.max_pixels, self._frames = max_pixels, frames
        self.max_bytes = max_bytes  # ScanReader.max_bytes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._nifti = LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True)
            self._series_reader = _series_reader_class()()
            self._series = LoadImage(reader=self._series_reader, image_only=True, ensure_channel_first=True)
            self._orient = Orientation(axcodes=ORIENTATION, labels=None)
        self._spacing = Spacing(pixdim=tuple(p.spacing), mode="bilinear") if p.spacing else None
        self._crop = ResizeWithPadOrCrop(spatial_size=(p.image_size,) * 3) if p.spacing else None
        self._shrink = Resize(spatial_size=(p.image_size,) * 3, mode="area")
        self._enlarge = Resize(spatial_size=(p.image_size,) * 3, mode="trilinear")

    def decode(self, path: Path) -> tuple[np.ndarray, bool, VolumeInfo]:
        """``(array (C, X, Y, Z), is_ct, info)``, or a :class:`ScanReadError`."""
        from medmeta.data.reading import _declared_pixels, _decode_failure, _reason, scan_format

        if path.is_dir():
            self._check_bytes(path, _dicom_files(path))  # before any header is parsed
            header = series_header(path)
            if header.pixels > self.max_pixels:
                raise ScanReadError(path, _reason("too_many_pixels", count=f"{header.pixels:,}", limit=f"{self.max_pixels:,}"))
            if len(header.files) == 1:  # one multi-frame file (or a single slice) in a folder
                return self._single_dicom(header.files[0])
            self._series_reader.order = tuple(str(f) for f in header.files)
            # only these files: MONAI would otherwise open every entry of the folder
            self._series_reader.fname_regex = "^(?:" + "|".join(re.escape(os.path.join(str(path), f.name)) for f in header.files) + ")$"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    image = self._series(str(path))
            except Exception as exc:  # noqa: BLE001 - one fixed-wording reason, never the decoder's message
                raise ScanReadError(path, _reason("undecodable", format="DICOM", exception=type(exc).__name__)) from None
            if header.has_geometry:
                array = self._oriented(image, path)
            else:  # no patient geometry: (columns, rows, slices in InstanceNumber order) as stored
                array = np.asarray(image, dtype=np.float32)
            if header.invert:
                array = array.max() - array
            return array, header.is_ct, self._info(image, oriented=header.has_geometry)
        fmt = scan_format(path)
        if fmt == "dicom":
            return self._single_dicom(path)
        if fmt != "nifti":
            raise ScanReadError(path, _reason("image_for_3d", shape="(2D image file)"))
        self._check_bytes(path, [path])
        declared = _declared_pixels(path, "nifti")  # from the header: a small .nii.gz can hold gigabytes
        if declared > self.max_pixels:
            raise ScanReadError(path, _reason("too_many_pixels", count=f"{declared:,}", limit=f"{self.max_pixels:,}"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = self._nifti(str(path))
        except Exception as exc:  # noqa: BLE001
            raise ScanReadError(path, _decode_failure(path, "nifti", exc, None)) from None
        array = self._oriented(image, path)
        return array, False, self._info(image, oriented=True)

    def _check_bytes(self, path: Path, files: Any) -> None:
        """Refuse ``path`` when its files hold more than :attr:`max_bytes` in all, or a deflated
        DICOM among them would inflate beyond it (nothing is decoded)."""
        from medmeta.data.reading import _check_deflated_size, _reason, scan_format

        total = sum(Path(f).stat().st_size for f in files)
        if total > self.max_bytes:
            raise ScanReadError(path, _reason("too_many_bytes", count=f"{total:,}", limit=f"{self.max_bytes:,}"))
        for file in files:
            if scan_format(Path(file)) == "dicom":
                try:
                    _check_deflated_size(Path(file), self.max_bytes)
                except ScanReadError as exc:  # named by the volume (the folder), with the file's reason
                    raise ScanReadError(path, exc.reason) from None

    def _single_dicom(self, path: Path) -> tuple[np.ndarray, bool, VolumeInfo]:
        """A multi-frame DICOM file: ``(1, frames, rows, columns)`` as stored."""
        from medmeta.data.reading import _dicom_header, _reason

        self._check_bytes(path, [path])
        info = _dicom_header(path)
        if info.frames < 2:
            raise ScanReadError(path, _reason("image_for_3d", shape="(one DICOM slice; a series is a folder of slices)"))
        array, is_ct = self._frames(path)
        return array, is_ct, VolumeInfo(tuple(array.shape[1:]), None, oriented=False)

    def _oriented(self, image: Any, path: Path) -> np.ndarray:
        from medmeta.data.reading import _reason

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if image.shape[0] > 1:  # a 4D NIfTI: its time axis became the channels; the first volume
                image = image[:1]
            image = self._orient(image)
            if self._spacing is not None:
                voxels = self._resampled_voxels(image)
                if voxels > self.max_pixels:  # e.g. 5 mm slices resampled to 0.5 mm: ten times the volume
                    raise ScanReadError(path, _reason("resampled_too_large", count=f"{voxels:,}", limit=f"{self.max_pixels:,}"))
                image = self._spacing(image)
        return np.asarray(image, dtype=np.float32)

    def _resampled_voxels(self, image: Any) -> int:
        """Voxels of ``image`` (``(C, X, Y, Z)`` with its spacing) once resampled to the set spacing."""
        spacing = np.asarray(getattr(image, "pixdim", np.ones(3)), dtype=np.float64)[:3]
        shape = np.asarray(image.shape[1:4], dtype=np.float64)
        extent = np.ceil(shape * np.abs(spacing) / np.asarray(self.preprocessing.spacing, dtype=np.float64))
        return int(np.prod(np.maximum(extent, 1.0))) * int(image.shape[0])

    @staticmethod
    def _info(image: Any, oriented: bool) -> VolumeInfo:
        """The stored shape of a decoded volume, and its spacing when it has geometry."""
        spacing = getattr(image, "pixdim", None) if oriented else None
        shape = tuple(int(s) for s in image.shape[1:])
        values = tuple(float(s) for s in np.asarray(spacing).tolist()[:3]) if spacing is not None else None
        return VolumeInfo(shape, values, oriented)

    def to_cube(self, tensor: Any) -> Any:
        """``(C, X, Y, Z)`` tensor -> ``(C, size, size, size)``: cropped/padded after resampling
        to a set spacing, otherwise resized (area averaging when shrinking)."""
        if self._crop is not None:
            return self._crop(tensor)
        return (self._shrink if min(tensor.shape[1:]) >= self.preprocessing.image_size else self._enlarge)(tensor)
