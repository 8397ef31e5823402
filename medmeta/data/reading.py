"""Reading one scan (DICOM, NIfTI, PNG/JPEG or an in-memory array) into a model-ready tensor.

Decoding goes through MONAI's ``LoadImage`` with its pydicom, nibabel and PIL readers; a DICOM
file whose pixels pydicom decodes is read once with pydicom and its pixels taken as MONAI's
reader would give them, without the metadata MONAI builds (bit for bit the same values). Every
scan leaves here as a channel-first ``float32`` tensor of shape ``(channels, image_size,
image_size)`` with intensities in ``[0, 1]``:

- spatial layout: every format comes out in display (row, column) layout: DICOM and 2D images
  as ``pydicom``'s ``pixel_array`` and PIL show them, a NIfTI with its first voxel axis (i, the
  x direction) as columns. A volume (a NIfTI with several slices, a multi-frame DICOM, a 3D
  array) is refused by a 2D reader, never sliced; with ``Preprocessing.spatial_dims == 3`` it
  is read whole, as ``(channels, size, size, size)`` (:mod:`medmeta.data.volumes`).
- intensity: a CT window (level/width in Hounsfield units) when the DICOM says ``Modality`` CT,
  robust min-max (percentiles) otherwise; MONOCHROME1 DICOM is inverted so bright means dense.
- channels: grayscale is repeated to 3 channels, RGB is turned to luminance for 1 channel,
  alpha is dropped.
- size: resized to a square ``image_size``: area averaging when shrinking (no aliasing, no
  darkened border), bilinear when enlarging.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import math
import re
import string
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmeta.data.plain_tensors import plain_tensors
from medmeta.errors import ScanReadError

DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Files beside scans that are never scans themselves (skipped silently in class folders).
SIDECAR_SUFFIXES = (".csv", ".json", ".txt", ".md", ".yaml", ".yml", ".html", ".xml", ".npz")

#: Every reason a :class:`ScanReadError` from :class:`ScanReader` can give (rejected.csv,
#: report.json, report.html). Each is fixed wording; a ``{field}`` is filled only with what the
#: tool itself knows: numbers it computed, a DICOM element's keyword and tag from pydicom's
#: dictionary, a transfer syntax's name from pydicom's UID dictionary, a format's name, an
#: exception's class name. Never a decoder's message, never a value read from a file's header
#: (DICOM and NIfTI headers hold free text, patient data and UIDs).
REJECTION_REASONS: dict[str, str] = {
    "not_found": "file not found",
    "unsupported_type": "unsupported file type (expected DICOM, NIfTI, PNG or JPEG)",
    "too_many_pixels": "declares {count} pixels, more than the {limit} a scan may have (not decoded)",
    "too_many_bytes": "holds {count} bytes, more than the {limit} a scan within the pixel cap may need (not read)",
    "dicom_deflate_bomb": (
        "deflated DICOM data expands to more than {limit} bytes, more than a scan within the pixel cap"
        " may need (not decoded)"
    ),
    "dicom_unparsable": "not a readable DICOM file (the header cannot be parsed)",
    "dicom_not_part10": "not a DICOM file (the 'DICM' prefix or the file meta header is missing)",
    "dicom_no_image": "DICOM file has no image (no Rows/PixelData)",
    "dicom_element": "DICOM element {element} is missing or invalid",
    "dicom_photometric": "unsupported PhotometricInterpretation (0028,0004)",
    "dicom_no_pixel_data": "PixelData (7FE0,0010) is missing (no pixel data, or the file ends before it)",
    "dicom_pixel_length": (
        "PixelData (7FE0,0010) does not hold the pixels Rows x Columns x frames x BitsAllocated declare"
        " (truncated or corrupt)"
    ),
    "dicom_codec": "compressed pixel data in {transfer_syntax} that no installed codec can decode{codec_hint}",
    "image_unrecognised": "not a PNG/JPEG/BMP/TIFF image (content not recognised)",
    "image_truncated": "the image file is truncated or corrupt",
    "nifti_unrecognised": "not a NIfTI file (header not recognised)",
    "compressed_data": "compressed data is truncated or corrupt",
    "undecodable": "cannot decode as {format} ({exception})",
    "degenerate": "empty or degenerate image of shape {shape}",
    "non_finite": "image contains NaN or infinite values",
    "blank": "blank image (constant intensity)",
    "array_shape": "expected a 2D image array, got shape {shape}",
    "volume_array_shape": "expected a 3D volume array (depth, rows, columns), got shape {shape}",
    "volume_for_2d": (
        "a volume of shape {shape}, but this model reads 2D images; train a 3D model"
        " (episodes.spatial_dims: 3) for volumes: no slice is chosen silently"
    ),
    "image_for_3d": "a 2D image {shape}, but this model reads volumes (3D)",
    "series_empty": "the folder holds no DICOM file (a DICOM series is a folder of its slices)",
    "series_mixed": "the folder holds {count} DICOM series (SeriesInstanceUID); put each series in a folder of its own",
    "series_geometry": "the slices of the series differ in {what}",
    "series_order": "the slices carry neither ImagePositionPatient nor InstanceNumber, so their order is unknown",
    "resampled_too_large": (
        "resampling to the protocol's voxel spacing would give {count} voxels, more than the {limit} a scan may have"
        " (not resampled)"
    ),
}

#: What each ``{field}`` of :data:`REJECTION_REASONS` may hold, as a regular expression.
REJECTION_REASON_FIELDS: dict[str, str] = {
    "count": r"[0-9][0-9,]*",
    "limit": r"[0-9][0-9,]*",
    "element": r"[A-Za-z]+ \([0-9A-F]{4},[0-9A-F]{4}\)",
    "transfer_syntax": r"an unknown transfer syntax|[A-Z][A-Za-z0-9 (),./\[\]-]*",
    "codec_hint": r"(?: \(the DICOM pixel-data codecs are not installed: pip install \"medmeta\[dicom-codecs\]\"\))?",
    "format": r"DICOM|NIfTI|PNG/JPEG/BMP/TIFF",
    "exception": r"[A-Za-z_][A-Za-z0-9_]*",
    "shape": r"\((?:[0-9]+(?:, [0-9]+)*,?)?\)|\((?:2D image file|one DICOM slice; a series is a folder of slices)\)",
    "what": (
        r"sizes \(Rows x Columns\)|frame counts \(a multi-frame file among slices\)|orientations \(ImageOrientationPatient\)"
        r"|positions \(two slices at one position\)|InstanceNumbers \(two slices with one number\)"
    ),
}


def rejection_reason_pattern(key: str) -> re.Pattern[str]:
    """The regular expression a whole reason of kind ``key`` (of :data:`REJECTION_REASONS`) matches."""
    parts = [
        re.escape(literal) + (f"(?:{REJECTION_REASON_FIELDS[name]})" if name else "")
        for literal, name, _, _ in string.Formatter().parse(REJECTION_REASONS[key])
    ]
    return re.compile("".join(parts))


def is_rejection_reason(reason: str) -> bool:
    """Whether ``reason`` is one of :data:`REJECTION_REASONS`, its fields holding what they may."""
    return any(rejection_reason_pattern(key).fullmatch(reason) for key in REJECTION_REASONS)


def _reason(key: str, **fields: str) -> str:
    """The reason of kind ``key`` with its fields filled in."""
    return REJECTION_REASONS[key].format(**fields)


# MONAI announces at import that an optional GPU DICOM codec is absent; that is expected here.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

_LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def scan_format(path: str | Path) -> str | None:
    """``"dicom"``, ``"nifti"`` or ``"image"`` by suffix (or the DICOM preamble), else ``None``."""
    name = Path(path).name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if name.endswith(SIDECAR_SUFFIXES):
        return None
    try:  # DICOM files often have no extension: look for the "DICM" magic after the preamble
        with open(path, "rb") as handle:
            head = handle.read(132)
        if len(head) == 132 and head[128:] == b"DICM":
            return "dicom"
    except OSError:
        return None
    return None


@dataclass
class Preprocessing:
    """How a scan becomes a tensor; stored in every checkpoint so adaptation matches training."""

    image_size: int = 64
    channels: int = 3
    ct_window: tuple[float, float] = (40.0, 400.0)  # (level, width) in HU
    percentiles: tuple[float, float] = (0.5, 99.5)
    #: 2: images ``(C, size, size)``; 3: volumes ``(C, size, size, size)`` (:mod:`medmeta.data.volumes`)
    spatial_dims: int = 2
    #: volumes only: resample to this voxel spacing (mm) and crop/pad to the cube; ``None``:
    #: resize the whole volume to the cube
    spacing: tuple[float, float, float] | None = None
    #: ``auto``: the CT window when DICOM says Modality CT, robust percentiles otherwise;
    #: ``ct``: always the CT window (e.g. NIfTI in Hounsfield units); ``mr``: robust
    #: percentiles of the non-zero (foreground) voxels, so an MR's empty background does not
    #: set the scale; ``percentile``: robust percentiles of every voxel
    intensity: str = "auto"

    def __post_init__(self) -> None:
        from medmeta.errors import MedmetaError

        if not _is_int(self.spatial_dims) or self.spatial_dims not in (2, 3):
            raise MedmetaError(f"preprocessing spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if self.intensity not in INTENSITY_MODES:
            raise MedmetaError(f"preprocessing intensity must be one of {', '.join(INTENSITY_MODES)}, got {self.intensity!r}")
        if self.spacing is not None and (
            not isinstance(self.spacing, tuple) or len(self.spacing) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in self.spacing)
        ):
            raise MedmetaError(f"preprocessing spacing must be three positive millimetre values, got {self.spacing!r}")
        if self.spacing is not None and self.spatial_dims != 3:
            raise MedmetaError("preprocessing spacing applies to volumes (spatial_dims 3) only")
        if self.spatial_dims == 3 and _is_int(self.image_size) and self.image_size > MAX_VOLUME_SIZE:
            raise MedmetaError(f"preprocessing image_size of a volume is at most {MAX_VOLUME_SIZE}, got {self.image_size!r}")

        if not _is_int(self.channels) or self.channels not in (1, 3):
            raise MedmetaError(f"preprocessing channels must be 1 or 3, got {self.channels!r}")
        if not _is_int(self.image_size) or not 2 <= self.image_size <= MAX_IMAGE_SIZE:
            raise MedmetaError(f"preprocessing image_size must be an integer from 2 to {MAX_IMAGE_SIZE}, got {self.image_size!r}")
        if not _numbers(self.ct_window) or not self.ct_window[1] > 0:
            raise MedmetaError(f"preprocessing ct_window must be (level, width) with width > 0, got {self.ct_window!r}")
        if not _numbers(self.percentiles) or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise MedmetaError(f"preprocessing percentiles must be (low, high) with 0 <= low < high <= 100, got {self.percentiles!r}")

    def to_dict(self) -> dict[str, Any]:
        """The stored record; the volume settings only for volumes and when not the defaults,
        so a 2D checkpoint's record is what it was before volumes existed."""
        data = asdict(self)
        if self.spatial_dims == 2:
            del data["spatial_dims"], data["spacing"]
        if self.intensity == "auto":
            del data["intensity"]
        return data


    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        """Rebuild from :meth:`to_dict` (a checkpoint's sidecar); every value is checked for type
        and bounds (:class:`MedmetaError`), so a forged sidecar cannot ask for a huge image."""
        from medmeta.errors import MedmetaError

        if not isinstance(data, dict) or "image_size" not in data or "channels" not in data:
            raise MedmetaError("preprocessing must be a mapping with image_size and channels")
        window, percentiles = data.get("ct_window", (40.0, 400.0)), data.get("percentiles", (0.5, 99.5))
        spacing = data.get("spacing")
        return cls(
            image_size=_whole_number(data["image_size"]),
            channels=_whole_number(data["channels"]),
            ct_window=tuple(window) if isinstance(window, (list, tuple)) else window,
            percentiles=tuple(percentiles) if isinstance(percentiles, (list, tuple)) else percentiles,
            spatial_dims=_whole_number(data.get("spatial_dims", 2)),
            spacing=tuple(spacing) if isinstance(spacing, (list, tuple)) else spacing,
            intensity=data.get("intensity", "auto"),
        )


#: Default cap on the pixels a scan's header may declare (rows x columns x frames x channels):
#: 50 million is a 7000 x 7000 image; a 9000 x 9000 PNG of 79 KB would otherwise take 4.5 GB.
MAX_PIXELS = 50_000_000

#: Largest side a scan is resized to (a bound on memory per scan: 3 x 1024 x 1024 floats is 12 MB).
MAX_IMAGE_SIZE = 1024
#: Largest side a volume is resized to (3 x 256^3 floats is 200 MB).
MAX_VOLUME_SIZE = 256
#: The intensity scalings of :attr:`Preprocessing.intensity`.
INTENSITY_MODES = ("auto", "ct", "mr", "percentile")


def _whole_number(value: Any) -> Any:
    """A whole number written as a number or as digits ("48") becomes an int; anything else is
    left for the bounds check to refuse."""
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(pair: Any) -> bool:
    """A pair of finite real numbers."""
    return (
        isinstance(pair, tuple) and len(pair) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair)
    )


@dataclass
class ScanReader:
    """Callable that turns a path or an array into a ``(channels, size, size)`` tensor.

    Raises :class:`~medmeta.errors.ScanReadError` naming the file and the reason for anything
    unreadable: unknown type, corrupt file, empty or constant image, non-finite values. Every
    reason is one of :data:`REJECTION_REASONS`: fixed wording, never a header value.
    """

    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    #: a file whose header declares more pixels than this is refused before it is decoded
    max_pixels: int = MAX_PIXELS

    @property
    def max_bytes(self) -> int:
        """The most bytes a scan's file (or a deflated DICOM once inflated) may hold: 8 bytes per
        pixel of :attr:`max_pixels` plus 64 MiB of header; beyond it the file is not read."""
        return self.max_pixels * 8 + (64 << 20)

    def __post_init__(self) -> None:
        from monai.data import NibabelReader, PILReader, PydicomReader
        from monai.transforms import LoadImage, Resize, ScaleIntensityRange

        p = self.preprocessing
        self._volume_reader = None
        with warnings.catch_warnings():  # MONAI warns when optional GPU codecs are absent
            warnings.simplefilter("ignore")
            self._loaders = self._make_loaders(LoadImage, NibabelReader, PILReader, PydicomReader)
        level, width = p.ct_window

        self._ct_window = ScaleIntensityRange(a_min=level - width / 2, a_max=level + width / 2, b_min=0.0, b_max=1.0, clip=True)
        self._shrink = Resize(spatial_size=(p.image_size, p.image_size), mode="area")
        self._enlarge = Resize(spatial_size=(p.image_size, p.image_size), mode="bilinear", align_corners=False)

    @staticmethod
    def _make_loaders(LoadImage, NibabelReader, PILReader, PydicomReader) -> dict:
        """``{format: (loader, reader)}``. The reader is passed at each call so that MONAI uses
        it alone: without it, a failure makes LoadImage try every registered reader and report
        all their tracebacks instead of the one reason that matters."""
        readers = {
            "dicom": PydicomReader(swap_ij=False),
            "nifti": NibabelReader(),
            "image": PILReader(reverse_indexing=False, converter=_pil_to_intensities),
        }
        return {fmt: (LoadImage(reader=r, image_only=True, ensure_channel_first=True), r) for fmt, r in readers.items()}

    # -- public -------------------------------------------------------------------------------
    def __call__(self, source: str | Path | np.ndarray, name: str | None = None) -> torch.Tensor:
        return self.read(source, name)[0]

    def read(self, source: str | Path | np.ndarray, name: str | None = None) -> tuple[torch.Tensor, Any]:
        """``(tensor, info)``: ``info`` is the :class:`~medmeta.data.volumes.VolumeInfo` of a
        volume (its stored shape and spacing, for reports), ``None`` for an image."""
        volume = self.preprocessing.spatial_dims == 3
        if isinstance(source, np.ndarray):
            label = name or "<array>"
            array = _volume_from_array(source, label) if volume else _channel_first_from_array(source, label)
            is_ct, info = False, None
            if volume:
                from medmeta.data.volumes import VolumeInfo

                info = VolumeInfo(tuple(array.shape[1:]), None, oriented=False)
        elif volume:
            label = str(source)
            array, is_ct, info = self._volumes.decode(Path(source))
        else:
            label = str(source)
            array, is_ct = self._decode(Path(source))
            info = None
        return self._preprocess(array, is_ct, label), info

    def decode_frames(self, path: Path) -> tuple[np.ndarray, bool]:
        """A multi-frame DICOM file as ``(1, frames, rows, columns)`` (grayscale) and whether it
        is CT: the frames of a volume, for :mod:`medmeta.data.volumes`."""
        return self._decode(path, keep_frames=True)

    @property
    def _volumes(self):
        """The :class:`~medmeta.data.volumes.VolumeReader` of a volume reader (built once)."""
        if self._volume_reader is None:
            from medmeta.data.volumes import VolumeReader

            self._volume_reader = VolumeReader(self.preprocessing, self.max_pixels, frames=self.decode_frames, max_bytes=self.max_bytes)
        return self._volume_reader

    # -- steps --------------------------------------------------------------------------------
    def _decode(self, path: Path, keep_frames: bool = False) -> tuple[np.ndarray, bool]:
        if not path.is_file():
            raise ScanReadError(path, _reason("not_found"))
        fmt = scan_format(path)
        if fmt is None:
            raise ScanReadError(path, _reason("unsupported_type"))
        size, limit = path.stat().st_size, self.max_bytes
        if size > limit:
            raise ScanReadError(path, _reason("too_many_bytes", count=f"{size:,}", limit=f"{limit:,}"))
        dataset = None
        if fmt == "dicom":
            _check_deflated_size(path, limit)
            dataset = _read_whole_dicom(path)
        info = _dicom_header(path, dataset) if fmt == "dicom" else None
        declared = info.pixels if info is not None else _declared_pixels(path, fmt)
        if declared > self.max_pixels:
            raise ScanReadError(path, _reason("too_many_pixels", count=f"{declared:,}", limit=f"{self.max_pixels:,}"))
        if info is not None and info.frames > 1 and not keep_frames:
            raise ScanReadError(path, _reason("volume_for_2d", shape=str((info.frames, info.rows, info.columns))))
        pixels = _plain_dicom_pixels(dataset) if dataset is not None else None
        if pixels is not None:
            array = pixels[None]  # LoadImage's channel-first of a DICOM (a new first axis)
        else:
            array = self._load(path, fmt, info)
        if info is not None:
            array = _dicom_frames(array, info) if keep_frames else _dicom_to_chw(array, info)
            if info.invert:
                array = array.max() - array
            return array, info.is_ct
        if fmt == "nifti":
            spatial = array.shape[1:4]
            if len(spatial) == 3 and spatial[2] > 1:
                raise ScanReadError(path, _reason("volume_for_2d", shape=str(tuple(int(s) for s in spatial))))
        array = _reduce_to_2d(array)
        if fmt == "nifti":  # voxel (i, j) -> display (row = j, column = i)
            array = np.swapaxes(array, 1, 2)
        return array, False

    def _load(self, path: Path, fmt: str, info: _DicomInfo | None) -> np.ndarray:
        """The scan's pixels through MONAI's ``LoadImage`` with the format's reader, as
        ``float32``: channel first for NIfTI and images, a new first axis for DICOM."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loader, reader = self._loaders[fmt]
                image = loader(str(path), reader=reader)
        except Exception as exc:  # every decoder failure becomes one fixed-wording line
            raise ScanReadError(path, _decode_failure(path, fmt, exc, info)) from None
        return np.asarray(image, dtype=np.float32)

    def _preprocess(self, array: np.ndarray, is_ct: bool, label: str) -> torch.Tensor:
        if array.size == 0 or min(array.shape[1:]) < 2:
            raise ScanReadError(label, _reason("degenerate", shape=str(tuple(array.shape))))
        if not np.isfinite(array).all():
            raise ScanReadError(label, _reason("non_finite"))
        p = self.preprocessing
        # Grayscale to 3 channels is repeated last when the image is shrunk: scaling and area
        # resizing act on each channel alone, and the percentiles are those of the repeated
        # pixels, so the values are the same bit for bit at a third of the work. (Not when it is
        # enlarged: torch's one-thread bilinear kernel rounds one channel differently from three.)
        shrunk = min(array.shape[1:]) >= p.image_size
        repeat = 3 if p.channels == 3 and array.shape[0] == 1 and p.spatial_dims == 2 and p.intensity != "mr" and shrunk else 1
        if repeat == 1:
            array = _to_channels(array, p.channels)
        with plain_tensors():
            resized = self._scale_and_resize(array, is_ct, label, repeat)
        resized = resized.to(torch.float32).clamp_(0.0, 1.0)
        return resized.repeat(repeat, 1, 1) if repeat > 1 else resized.contiguous()

    def _scale_and_resize(self, array: np.ndarray, is_ct: bool, label: str, repeat: int) -> torch.Tensor:
        p = self.preprocessing
        if p.intensity == "ct" or (p.intensity == "auto" and is_ct):
            scaled = self._ct_window(array)
        else:
            if float(array.max()) == float(array.min()):
                raise ScanReadError(label, _reason("blank"))
            with warnings.catch_warnings():  # MONAI warns when the percentiles coincide (a mostly uniform scan)
                warnings.simplefilter("ignore")
                if p.intensity == "mr":
                    scaled = self._foreground_percentiles(array)
                else:
                    scaled = self._robust_percentiles(array, repeat)
        tensor = torch.as_tensor(np.asarray(scaled), dtype=torch.float32)
        if p.spatial_dims == 3:
            resized = torch.as_tensor(self._volumes.to_cube(tensor)).as_subclass(torch.Tensor)
        else:
            resize = self._shrink if min(tensor.shape[1:]) >= p.image_size else self._enlarge
            resized = torch.as_tensor(resize(tensor)).as_subclass(torch.Tensor)  # plain tensor, no MONAI metadata
        return resized

    def _robust_percentiles(self, array: np.ndarray, repeat: int = 1) -> np.ndarray:
        """The robust percentiles of every pixel map to ``[0, 1]``, clipped: MONAI's
        ``ScaleIntensityRangePercentiles`` of ``array`` repeated ``repeat`` times along its first
        axis (the percentiles of that array, the scaling applied to ``array`` alone), bit for bit.
        The two order statistics each percentile interpolates are found directly
        (:func:`_order_statistics`: a histogram of integer pixels, else one ``np.partition``)
        instead of by the full sorts of two ``torch.quantile`` calls (19 of the 26 ms a 256 x 256
        DICOM took to read). The interpolation is torch's own: ``q`` in float32, ranks
        ``q * (n - 1)``, ``lerp`` of the neighbours; arrays of over a million values go through
        ``np.percentile`` as in MONAI."""
        from monai.transforms import ScaleIntensityRange

        flat = array.reshape(-1)
        image = torch.as_tensor(array)
        n = flat.size * repeat
        if n > 1_000_000:  # MONAI's own switch to numpy
            values = np.repeat(flat, repeat) if repeat > 1 else flat
            bounds = [torch.as_tensor(np.percentile(values, q), dtype=image.dtype) for q in self.preprocessing.percentiles]
        else:
            ranks = [torch.tensor(q / 100.0, dtype=image.dtype) * (n - 1) for q in self.preprocessing.percentiles]
            below = [int(r) for r in ranks]
            above = [int(torch.ceil(r)) for r in ranks]
            # position k of the repeated pixels in sorted order is position k // repeat of the pixels
            picked = _order_statistics(flat, sorted({k // repeat for k in below + above}))
            bounds = [
                torch.lerp(torch.as_tensor(picked[b // repeat]), torch.as_tensor(picked[a // repeat]), r - b)
                for r, b, a in zip(ranks, below, above)
            ]
        low, high = bounds
        return np.asarray(ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(image))

    def _foreground_percentiles(self, array: np.ndarray) -> np.ndarray:
        """MR scaling: the robust percentiles of the non-zero voxels map to ``[0, 1]`` (MONAI
        ``ScaleIntensityRange``), so an empty background does not set the scale."""
        from monai.transforms import ScaleIntensityRange

        foreground = array[array != 0]
        low, high = np.percentile(foreground if foreground.size else array, self.preprocessing.percentiles)
        if high <= low:
            low, high = float(array.min()), float(array.max())
        return np.asarray(ScaleIntensityRange(a_min=float(low), a_max=float(high), b_min=0.0, b_max=1.0, clip=True)(array))


#: The most histogram bins :func:`_order_statistics` uses per pixel (beyond, it sorts partially).
_BINS_PER_PIXEL = 4


def _order_statistics(flat: np.ndarray, positions: list[int]) -> dict[int, np.float32]:
    """``{k: the k-th smallest value of flat}`` (0-based) for each ``k`` of ``positions``: what
    ``np.partition(flat, positions)[k]`` holds, exactly. Pixels that are all whole numbers over a
    range of fewer than ``_BINS_PER_PIXEL`` bins per pixel plus 65,536 (any DICOM, 8/16-bit
    image) are counted in a histogram, linear in the pixels (0.12 ms for a 256 x 256 image
    against 0.6 ms for the partial sort); others (and any holding -0.0) go through one
    ``np.partition``."""
    if flat.dtype == np.float32 and np.array_equal(flat, np.floor(flat)):
        low, high = int(flat.min()), int(flat.max())
        signed_zero = low <= 0 <= high and bool(np.signbit(flat[flat == 0]).any())  # -0.0 is kept by the sort alone
        if high - low < _BINS_PER_PIXEL * flat.size + (1 << 16) and not signed_zero:
            below_or_at = np.cumsum(np.bincount(flat.astype(np.int64) - low, minlength=high - low + 1))
            found = np.searchsorted(below_or_at, positions, side="right")  # first value with more than k below or at it
            return {k: np.float32(low + int(v)) for k, v in zip(positions, found)}
    picked = np.partition(flat, positions)
    return {k: picked[k] for k in positions}


@dataclass(frozen=True)
class _DicomInfo:
    is_ct: bool
    invert: bool
    frames: int
    samples: int
    pixels: int = 0  # declared in the header: rows x columns x frames x samples
    rows: int = 0
    columns: int = 0
    transfer_syntax: str = ""
    #: conditionally required elements the header lacks; named only if decoding then fails
    absent: tuple[str, ...] = ()


#: pydicom's limits on the image pixel module (``pydicom.pixels.common.RunnerBase._validate_options``),
#: checked before decoding so that a bad element is named: keyword -> (required, accepts(value,
#: values seen so far)). BitsStored and PixelRepresentation are not required of float pixel data,
#: which the header read without the pixels cannot tell apart: their absence (and that of
#: PlanarConfiguration) is named only when decoding fails.
_PIXEL_MODULE: dict[str, tuple[bool, Callable[[int, dict[str, int]], bool]]] = {
    "Rows": (True, lambda v, seen: 1 <= v <= 0xFFFF),
    "Columns": (True, lambda v, seen: 1 <= v <= 0xFFFF),
    "SamplesPerPixel": (True, lambda v, seen: v in (1, 3)),
    "BitsAllocated": (True, lambda v, seen: v == 1 or (v % 8 == 0 and 8 <= v <= 64)),
    "BitsStored": (False, lambda v, seen: 1 <= v <= seen["BitsAllocated"]),
    "PixelRepresentation": (False, lambda v, seen: v in (0, 1)),
    "PlanarConfiguration": (False, lambda v, seen: v in (0, 1)),  # looked at for colour only
}
#: The PhotometricInterpretation values pydicom decodes (``pydicom.pixels.common.PhotometricInterpretation``).
_PHOTOMETRIC = (
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT",
    "HSV", "ARGB", "CMYK", "YBR_PARTIAL_422", "YBR_PARTIAL_420",
)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_INVALID = object()


#: Transfer syntax whose whole dataset is deflated (pydicom inflates it in one piece when reading).
_DEFLATED = "1.2.840.10008.1.2.1.99"
#: Value representations whose explicit-VR element header has a 4-byte length (DICOM PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _check_deflated_size(path: Path, limit: int) -> None:
    """Refuse a deflated DICOM whose dataset inflates to more than ``limit`` bytes, counted by
    inflating it in 1 MiB pieces that are thrown away (a 1 MB file can otherwise make pydicom
    inflate gigabytes into memory). Other transfer syntaxes are left alone."""
    start = _deflated_dataset_offset(path)
    if start is None:
        return
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            while chunk := handle.read(1 << 16):
                while chunk:
                    total += len(inflater.decompress(chunk, 1 << 20))
                    if total > limit:
                        raise ScanReadError(path, _reason("dicom_deflate_bomb", limit=f"{limit:,}"))
                    chunk = inflater.unconsumed_tail
                if inflater.eof:
                    return
    except (OSError, zlib.error):
        return  # not a deflate stream after all: pydicom reports what is wrong


def _deflated_dataset_offset(path: Path) -> int | None:
    """Where the deflated dataset of a Part 10 file starts (after the file meta group, always
    explicit VR little endian), or ``None`` when its transfer syntax is not deflated."""
    try:
        with open(path, "rb") as handle:
            if handle.read(132)[128:] != b"DICM":
                return None
            offset, syntax = 132, b""
            while len(head := handle.read(8)) == 8:
                group, element = struct.unpack("<HH", head[:4])
                if group != 0x0002:
                    break
                vr = head[4:6]
                if vr in _LONG_VRS:
                    length, header = struct.unpack("<I", handle.read(4))[0], 12
                else:
                    length, header = struct.unpack("<H", head[6:8])[0], 8
                value = handle.read(min(length, 1 << 16))
                if element == 0x0010:
                    syntax = value
                offset += header + length
                handle.seek(offset)
    except (OSError, struct.error):
        return None
    return offset if syntax.rstrip(b"\0 ").decode("ascii", "replace") == _DEFLATED else None


def _read_dicom_header(path: Path) -> Any:
    """The DICOM header (pydicom dataset) without the pixels, or a :class:`ScanReadError`."""
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - the parser's message may quote header bytes: not repeated
        raise ScanReadError(path, _reason("dicom_unparsable")) from None


def _read_whole_dicom(path: Path) -> Any:
    """The DICOM dataset, parsed once, its values over 1 MB (the pixel data) left in the file
    until used (so a scan refused for its declared size is never loaded), or ``None`` when
    pydicom cannot parse the file: :func:`_dicom_header` then reads the header alone and says
    what is wrong."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, force=True, defer_size="1 MB")  # large values (the pixels) read on use
    except Exception:  # noqa: BLE001 - the header check and the decoder report the problem
        return None


def _plain_dicom_pixels(dataset: Any) -> np.ndarray | None:
    """A DICOM dataset's pixels as MONAI's ``PydicomReader`` (``swap_ij=False``) and ``LoadImage``
    give them, without the metadata MONAI builds and the second read of the file: pydicom's
    ``pixel_array``, times ``RescaleSlope`` plus ``RescaleIntercept`` when the header holds
    either, as ``float32`` (bit for bit the same: ``tests/test_reader_fast_paths.py``). ``None`` for
    what MONAI reads another way (a segmentation) and for pixels pydicom cannot decode: the
    caller then reads through ``LoadImage``, whose failure names the reason."""
    if hasattr(dataset, "SegmentSequence"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = dataset.pixel_array
            if data.dtype.kind not in "uif":
                return None
            # MONAI's own rule (PydicomReader._get_array_data): either element present -> rescale
            slope, offset, rescale = 1.0, 0.0, False
            if hasattr(dataset, "RescaleSlope"):
                slope, rescale = dataset.RescaleSlope, True
            if hasattr(dataset, "RescaleIntercept"):
                offset, rescale = dataset.RescaleIntercept, True
            if rescale:
                data = data.astype(np.float32) * slope + offset
            return np.asarray(data, dtype=np.float32)
    except Exception:  # noqa: BLE001 - LoadImage reads it again and its failure is reported
        return None


def _dicom_header(path: Path, header: Any = None) -> _DicomInfo:
    """The DICOM header (read here unless ``header``, from :func:`_read_dicom_header`, is
    given), with its image pixel module checked as pydicom checks it when decoding; anything
    wrong is a :class:`ScanReadError` naming the element."""
    if header is None:
        header = _read_dicom_header(path)
    if getattr(header, "preamble", b"") is None:  # no "DICM": the decoder (pydicom unforced) refuses it
        raise ScanReadError(path, _reason("dicom_not_part10"))
    if "Rows" not in header and "Columns" not in header:
        raise ScanReadError(path, _reason("dicom_no_image"))
    values, absent = _pixel_module(header, path)
    photometric = _element_value(header, "PhotometricInterpretation")
    if not isinstance(photometric, str) or not photometric:
        raise ScanReadError(path, _reason("dicom_element", element=_element_name("PhotometricInterpretation")))
    if photometric not in _PHOTOMETRIC:
        raise ScanReadError(path, _reason("dicom_photometric"))
    frames, samples = _number_of_frames(header, path), values["SamplesPerPixel"]
    modality = _element_value(header, "Modality")
    syntax = _element_value(getattr(header, "file_meta", {}), "TransferSyntaxUID")
    return _DicomInfo(
        is_ct=isinstance(modality, str) and modality.upper() == "CT",
        invert=photometric == "MONOCHROME1",
        frames=frames,
        samples=samples,
        pixels=values["Rows"] * values["Columns"] * frames * samples,
        rows=values["Rows"],
        columns=values["Columns"],
        transfer_syntax=syntax if isinstance(syntax, str) else "",
        absent=absent,
    )


def _pixel_module(header: Any, path: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """The whole-number elements of :data:`_PIXEL_MODULE` that the header holds, and those it
    lacks that only some pixel data needs; a required one missing, or any one out of pydicom's
    bounds, is a :class:`ScanReadError`."""
    seen: dict[str, int] = {}
    absent = []
    for keyword, (required, accepts) in _PIXEL_MODULE.items():
        if keyword == "PlanarConfiguration" and seen["SamplesPerPixel"] == 1:
            continue  # pydicom ignores it for one sample per pixel
        value = _element_value(header, keyword)
        if value is None and not required:
            absent.append(keyword)
            continue
        if not _is_int(value) or not accepts(value, seen):
            raise ScanReadError(path, _reason("dicom_element", element=_element_name(keyword)))
        seen[keyword] = int(value)
    return seen, tuple(absent)


def _number_of_frames(header: Any, path: Path) -> int:
    """NumberOfFrames as pydicom takes it: absent, empty or 0 is one frame, digits (or a whole
    number written as ``"3.0"``) are a number."""
    value = _element_value(header, "NumberOfFrames")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None or value == 0:
        return 1
    if not _is_int(value) or value < 1:
        raise ScanReadError(path, _reason("dicom_element", element=_element_name("NumberOfFrames")))
    return int(value)


def _element_value(dataset: Any, keyword: str) -> Any:
    """An element's value (``None`` when absent or empty), or ``_INVALID`` when pydicom cannot
    convert the stored bytes."""
    try:
        return dataset.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed value is reported by the element's name only
        return _INVALID


def _element_name(keyword: str) -> str:
    """``"BitsAllocated (0028,0100)"``: a DICOM keyword and its tag, from pydicom's dictionary."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _declared_pixels(path: Path, fmt: str) -> int:
    """Pixels a PNG/JPEG or NIfTI header declares, read without decoding (0 when the header
    cannot be read: decoding then reports the problem)."""
    try:
        if fmt == "image":
            from PIL import Image

            try:
                with Image.open(path) as image:
                    return int(image.size[0]) * int(image.size[1]) * int(getattr(image, "n_frames", 1) or 1)
            except Image.DecompressionBombError as exc:  # PIL refuses to open beyond 2 x MAX_IMAGE_PIXELS
                counted = re.search(r"\((\d+) pixels\)", str(exc))  # the size PIL computed from the header
                return int(counted.group(1)) if counted else 2 * int(Image.MAX_IMAGE_PIXELS or 0) + 1
        import nibabel

        return int(np.prod(nibabel.load(str(path)).header.get_data_shape(), dtype=np.int64))
    except Exception:  # noqa: BLE001 - any unreadable header is left to the decoder to report
        return 0


def _dicom_to_chw(array: np.ndarray, info: _DicomInfo) -> np.ndarray:
    """MONAI's DICOM array -> ``(C, H, W)``.

    With ``swap_ij=False`` MONAI gives ``(1, H, W)``, ``(1, H, W, samples)`` for colour,
    ``(1, frames, H, W[, samples])`` for multi-frame: frames first, colour last.
    """
    a = array[0] if array.shape[0] == 1 else array
    if info.frames > 1 and a.ndim >= 3 and a.shape[0] == info.frames:
        a = a[info.frames // 2]
    if info.samples > 1 and a.ndim == 3 and a.shape[-1] == info.samples:
        return np.moveaxis(a, -1, 0)
    return _reduce_to_2d(a[None])


def _dicom_frames(array: np.ndarray, info: _DicomInfo) -> np.ndarray:
    """MONAI's multi-frame DICOM array ``(1, frames, H, W[, samples])`` -> ``(1, frames, H, W)``
    (colour frames to luminance)."""
    a = array[0] if array.shape[0] == 1 else array
    if info.samples > 1 and a.shape[-1] == info.samples:
        a = np.tensordot(a, _LUMINANCE, axes=([-1], [0]))
    return a[None].astype(np.float32)


def _volume_from_array(array: np.ndarray, label: str) -> np.ndarray:
    """An in-memory volume ``(D, H, W)`` or channel-first ``(C, D, H, W)`` (C in 1, 3) ->
    ``(C, D, H, W)``; anything else is refused."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3 and min(array.shape) > 1:
        return array[None]
    if array.ndim == 4 and array.shape[0] in (1, 3):
        return array
    if array.ndim == 2 or (array.ndim == 3 and min(array.shape) == 1):
        raise ScanReadError(label, _reason("image_for_3d", shape=str(tuple(array.shape))))
    raise ScanReadError(label, _reason("volume_array_shape", shape=str(tuple(array.shape))))


def _pil_to_intensities(image):
    """Palette, CMYK and other colour-model images -> RGB, so pixels are intensities, not indices."""
    if image.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "RGB", "RGBA"):
        return image
    return image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")


def _reduce_to_2d(array: np.ndarray) -> np.ndarray:
    """``(C, *spatial)`` -> ``(C, H, W)``: middle slice of volumes along the last axis."""
    while array.ndim > 3:
        array = array[..., array.shape[-1] // 2]
    if array.ndim == 2:
        array = array[None]
    return array


def _channel_first_from_array(array: np.ndarray, label: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3, 4):
        return np.moveaxis(array, -1, 0)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        return array
    if array.ndim == 3:  # (depth, rows, columns): a volume, not an image
        raise ScanReadError(label, _reason("volume_for_2d", shape=str(tuple(array.shape))))
    raise ScanReadError(label, _reason("array_shape", shape=str(tuple(array.shape))))


def _to_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """Bring a ``(C, H, W)`` array to ``channels`` (1 or 3)."""
    c = array.shape[0]
    if c == 4:  # RGBA: drop alpha
        array, c = array[:3], 3
    elif c not in (1, 3):  # e.g. a 4D NIfTI whose first axis is time: keep the first volume
        array, c = array[:1], 1
    if channels == c:
        return array
    if channels == 3 and c == 1:
        return np.repeat(array, 3, axis=0)
    if channels == 1 and c == 3:
        return np.tensordot(_LUMINANCE, array, axes=1)[None].astype(np.float32)
    raise ValueError(f"unsupported channel count {channels} (use 1 or 3)")


#: The optional extra that installs pydicom's pixel-data codecs (pyproject.toml).
DICOM_CODECS_EXTRA = 'pip install "medmeta[dicom-codecs]"'
#: The modules the extra installs: pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg.
_CODEC_MODULES = ("pylibjpeg", "libjpeg", "openjpeg")
#: Format names in the catch-all reason.
_FORMAT_NAMES = {"dicom": "DICOM", "nifti": "NIfTI", "image": "PNG/JPEG/BMP/TIFF"}
# pydicom's words when the pixel data is shorter than the header declares (pydicom 3: "The number
# of bytes of pixel data is less than expected"; pydicom 2: "... doesn't match the expected
# length"): used only to choose a fixed phrase, never repeated.
_PIXEL_LENGTH = re.compile(r"less than expected|doesn't match the expected length", re.IGNORECASE)


def _decode_failure(path: Path, fmt: str, exc: BaseException, info: _DicomInfo | None) -> str:
    """The fixed-wording reason why the decoder refused ``path``; the decoder's own message is
    never repeated, as it may quote header values."""
    if info is not None:
        return _dicom_failure(path, exc, info)
    causes = list(_causes(exc))
    if fmt == "image":
        from PIL import UnidentifiedImageError

        if any(isinstance(c, UnidentifiedImageError) for c in causes):
            return _reason("image_unrecognised")
        if any(type(c) in (OSError, SyntaxError, EOFError, struct.error, zlib.error) for c in causes):
            return _reason("image_truncated")  # PIL: "image file is truncated", "broken PNG file"
    elif fmt == "nifti":
        from nibabel.filebasedimages import ImageFileError

        if any(isinstance(c, ImageFileError) for c in causes):
            return _reason("nifti_unrecognised")
        if any(isinstance(c, (EOFError, zlib.error, gzip.BadGzipFile)) for c in causes):
            return _reason("compressed_data")
        if any(type(c) is OSError for c in causes):  # nibabel: "Expected N bytes, got M bytes"
            return _reason("image_truncated")
    return _reason("undecodable", format=_FORMAT_NAMES[fmt], exception=type(exc).__name__)


def _dicom_failure(path: Path, exc: BaseException, info: _DicomInfo) -> str:
    """Why a DICOM file whose header passed :func:`_dicom_header` did not decode: told from the
    file itself where it can be (no pixel data, a missing element, the transfer syntax)."""
    from pydicom.errors import InvalidDicomError

    if any(isinstance(c, InvalidDicomError) for c in _causes(exc)):
        return _reason("dicom_not_part10")
    present = _pixel_elements(path)
    if present == ():
        return _reason("dicom_no_pixel_data")
    needed = [k for k in info.absent if k == "PlanarConfiguration" or present == ("PixelData",)]
    if needed:
        return _reason("dicom_element", element=_element_name(needed[0]))
    if not info.transfer_syntax:
        return _reason("dicom_element", element=_element_name("TransferSyntaxUID"))
    if _PIXEL_LENGTH.search(" ".join(str(c) for c in _causes(exc))):
        return _reason("dicom_pixel_length")
    name = _transfer_syntax_name(info.transfer_syntax)
    if name is None or _is_compressed(info.transfer_syntax):
        return _reason(
            "dicom_codec",
            transfer_syntax=name or "an unknown transfer syntax",
            codec_hint=_codec_hint(info.transfer_syntax),
        )
    return _reason("undecodable", format=_FORMAT_NAMES["dicom"], exception=type(exc).__name__)


def _pixel_elements(path: Path) -> tuple[str, ...] | None:
    """The pixel-data elements (``PixelData``, ``FloatPixelData``...) the file holds, read with
    their values deferred (not loaded); ``None`` when the file cannot be parsed to the end."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, force=True, defer_size=1024)
        return tuple(keyword for keyword in _PIXEL_KEYWORDS if keyword in dataset)
    except Exception:  # noqa: BLE001 - unknown: the other checks decide
        return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _transfer_syntax_name(uid: str) -> str | None:
    """The transfer syntax's name in pydicom's UID dictionary (fixed text, never the file's own
    bytes), or ``None`` when the dictionary does not know it as a transfer syntax."""
    from pydicom.uid import UID

    known = UID(uid)
    return str(known.name) if known.type == "Transfer Syntax" else None


def _is_compressed(uid: str) -> bool:
    """Whether pydicom knows ``uid`` as a transfer syntax with compressed (encapsulated) pixels."""
    from pydicom.uid import UID

    try:
        return bool(UID(uid).is_compressed)
    except ValueError:  # not a transfer syntax pydicom knows
        return False


def _codec_hint(uid: str) -> str:
    """For pixel data compressed in a transfer syntax pydicom knows (JPEG, JPEG-LS, JPEG 2000...)
    while the codecs extra is not installed: which extra to install; ``""`` otherwise."""
    if not _is_compressed(uid):
        return ""
    if all(importlib.util.find_spec(name) is not None for name in _CODEC_MODULES):
        return ""  # the extra is installed: the data itself is the problem
    return f" (the DICOM pixel-data codecs are not installed: {DICOM_CODECS_EXTRA})"
