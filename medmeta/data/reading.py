"""Reading one scan (DICOM, NIfTI, PNG/JPEG or an in-memory array) into a model-ready tensor.

Decoding goes through MONAI's ``LoadImage`` with its pydicom, nibabel and PIL readers. Every
scan leaves here as a channel-first ``float32`` tensor of shape ``(channels, image_size,
image_size)`` with intensities in ``[0, 1]``:

- spatial layout: every format comes out in display (row, column) layout: DICOM and 2D images
  as ``pydicom``'s ``pixel_array`` and PIL show them, a NIfTI with its first voxel axis (i, the
  x direction) as columns. Volumes (NIfTI, multi-frame DICOM) are reduced to their middle slice
  along the last axis, because the models are 2D.
- intensity: a CT window (level/width in Hounsfield units) when the DICOM says ``Modality`` CT,
  robust min-max (percentiles) otherwise; MONOCHROME1 DICOM is inverted so bright means dense.
- channels: grayscale is repeated to 3 channels, RGB is turned to luminance for 1 channel,
  alpha is dropped.
- size: resized to a square ``image_size``: area averaging when shrinking (no aliasing, no
  darkened border), bilinear when enlarging.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmeta.errors import ScanReadError

DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Files beside scans that are never scans themselves (skipped silently in class folders).
SIDECAR_SUFFIXES = (".csv", ".json", ".txt", ".md", ".yaml", ".yml", ".html", ".xml", ".npz")

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

    def __post_init__(self) -> None:
        from medmeta.errors import MedmetaError

        if not _is_int(self.channels) or self.channels not in (1, 3):
            raise MedmetaError(f"preprocessing channels must be 1 or 3, got {self.channels!r}")
        if not _is_int(self.image_size) or not 2 <= self.image_size <= MAX_IMAGE_SIZE:
            raise MedmetaError(f"preprocessing image_size must be an integer from 2 to {MAX_IMAGE_SIZE}, got {self.image_size!r}")
        if not _numbers(self.ct_window) or not self.ct_window[1] > 0:
            raise MedmetaError(f"preprocessing ct_window must be (level, width) with width > 0, got {self.ct_window!r}")
        if not _numbers(self.percentiles) or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise MedmetaError(f"preprocessing percentiles must be (low, high) with 0 <= low < high <= 100, got {self.percentiles!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        """Rebuild from :meth:`to_dict` (a checkpoint's sidecar); every value is checked for type
        and bounds (:class:`MedmetaError`), so a forged sidecar cannot ask for a huge image."""
        from medmeta.errors import MedmetaError

        if not isinstance(data, dict) or "image_size" not in data or "channels" not in data:
            raise MedmetaError("preprocessing must be a mapping with image_size and channels")
        window, percentiles = data.get("ct_window", (40.0, 400.0)), data.get("percentiles", (0.5, 99.5))
        return cls(
            image_size=_whole_number(data["image_size"]),
            channels=_whole_number(data["channels"]),
            ct_window=tuple(window) if isinstance(window, (list, tuple)) else window,
            percentiles=tuple(percentiles) if isinstance(percentiles, (list, tuple)) else percentiles,
        )


#: Default cap on the pixels a scan's header may declare (rows x columns x frames x channels):
#: 50 million is a 7000 x 7000 image; a 9000 x 9000 PNG of 79 KB would otherwise take 4.5 GB.
MAX_PIXELS = 50_000_000

#: Largest side a scan is resized to (a bound on memory per scan: 3 x 1024 x 1024 floats is 12 MB).
MAX_IMAGE_SIZE = 1024


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
    unreadable: unknown type, corrupt file, empty or constant image, non-finite values.
    """

    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    #: a file whose header declares more pixels than this is refused before it is decoded
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        from monai.data import NibabelReader, PILReader, PydicomReader
        from monai.transforms import LoadImage, Resize, ScaleIntensityRange, ScaleIntensityRangePercentiles

        p = self.preprocessing
        with warnings.catch_warnings():  # MONAI warns when optional GPU codecs are absent
            warnings.simplefilter("ignore")
            self._loaders = self._make_loaders(LoadImage, NibabelReader, PILReader, PydicomReader)
        level, width = p.ct_window

        self._ct_window = ScaleIntensityRange(a_min=level - width / 2, a_max=level + width / 2, b_min=0.0, b_max=1.0, clip=True)
        self._robust = ScaleIntensityRangePercentiles(
            lower=p.percentiles[0], upper=p.percentiles[1], b_min=0.0, b_max=1.0, clip=True, channel_wise=False
        )
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
        if isinstance(source, np.ndarray):
            label = name or "<array>"
            array = _channel_first_from_array(source, label)
            is_ct = False
        else:
            label = str(source)
            array, is_ct = self._decode(Path(source))
        return self._preprocess(array, is_ct, label)

    # -- steps --------------------------------------------------------------------------------
    def _decode(self, path: Path) -> tuple[np.ndarray, bool]:
        if not path.is_file():
            raise ScanReadError(path, "file not found")
        fmt = scan_format(path)
        if fmt is None:
            raise ScanReadError(path, "unsupported file type (expected DICOM, NIfTI, PNG or JPEG)")
        info = _dicom_header(path) if fmt == "dicom" else None
        declared = info.pixels if info is not None else _declared_pixels(path, fmt)
        if declared > self.max_pixels:
            raise ScanReadError(
                path, f"declares {declared:,} pixels, more than the {self.max_pixels:,} a scan may have (not decoded)"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loader, reader = self._loaders[fmt]
                image = loader(str(path), reader=reader)
        except Exception as exc:  # every decoder failure becomes one clear line
            raise ScanReadError(path, f"cannot decode as {fmt}: {_whole_reason(exc)}{_codec_hint(fmt, exc)}") from None
        array = np.asarray(image, dtype=np.float32)
        if info is not None:
            array = _dicom_to_chw(array, info)
            if info.invert:
                array = array.max() - array
            return array, info.is_ct
        array = _reduce_to_2d(array)
        if fmt == "nifti":  # voxel (i, j) -> display (row = j, column = i)
            array = np.swapaxes(array, 1, 2)
        return array, False

    def _preprocess(self, array: np.ndarray, is_ct: bool, label: str) -> torch.Tensor:
        if array.size == 0 or min(array.shape[1:]) < 2:
            raise ScanReadError(label, f"empty or degenerate image of shape {tuple(array.shape)}")
        if not np.isfinite(array).all():
            raise ScanReadError(label, "image contains NaN or infinite values")
        array = _to_channels(array, self.preprocessing.channels)
        if is_ct:
            scaled = self._ct_window(array)
        else:
            if float(array.max()) == float(array.min()):
                raise ScanReadError(label, "blank image (constant intensity)")
            scaled = self._robust(array)
        tensor = torch.as_tensor(np.asarray(scaled), dtype=torch.float32)
        size = self.preprocessing.image_size
        resize = self._shrink if min(tensor.shape[1:]) >= size else self._enlarge
        resized = torch.as_tensor(resize(tensor)).as_subclass(torch.Tensor)  # plain tensor, no MONAI metadata
        return resized.to(torch.float32).clamp_(0.0, 1.0).contiguous()


@dataclass(frozen=True)
class _DicomInfo:
    is_ct: bool
    invert: bool
    frames: int
    samples: int
    pixels: int = 0  # declared in the header: rows x columns x frames x samples


def _dicom_header(path: Path) -> _DicomInfo:
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:
        raise ScanReadError(path, f"not a readable DICOM file: {_whole_reason(exc)}") from None
    if "PixelData" not in header and not hasattr(header, "Rows"):
        raise ScanReadError(path, "DICOM file has no image (no Rows/PixelData)")
    modality = str(getattr(header, "Modality", "")).upper()
    photometric = str(getattr(header, "PhotometricInterpretation", "")).upper()
    try:
        frames = int(getattr(header, "NumberOfFrames", 1) or 1)
        samples = int(getattr(header, "SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        frames, samples = 1, 1
    try:
        pixels = int(getattr(header, "Rows", 0) or 0) * int(getattr(header, "Columns", 0) or 0) * frames * samples
    except (TypeError, ValueError):
        pixels = 0
    return _DicomInfo(modality == "CT", photometric == "MONOCHROME1", frames, samples, pixels)


def _declared_pixels(path: Path, fmt: str) -> int:
    """Pixels a PNG/JPEG or NIfTI header declares, read without decoding (0 when the header
    cannot be read: decoding then reports the problem)."""
    try:
        if fmt == "image":
            from PIL import Image

            with Image.open(path) as image:
                return int(image.size[0]) * int(image.size[1]) * int(getattr(image, "n_frames", 1) or 1)
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
    if array.ndim == 3:
        return array
    raise ScanReadError(label, f"expected a 2D image array, got shape {tuple(array.shape)}")


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
# pydicom's words when no installed plugin/handler can decode compressed pixel data
# (pydicom 3: "... all plugins are missing dependencies: ...", "... exceptions were raised by all
# available plugins: ..."; pydicom 2: "... missing required dependencies ...", "No available image
# handler could decode ...").
_CODEC_FAILURE = re.compile(
    r"missing (required )?dependencies|no available (image |pixel data )?handler|all available plugins"
    r"|unable to decompress|requires? (gdcm|pylibjpeg)",
    re.IGNORECASE,
)


def _whole_reason(exc: BaseException) -> str:
    """An exception's whole message on one line: each line stripped, lines joined by ``"; "``
    (a space after a line that ends in ``:``, ``;``, ``,`` or ``.``), nothing cut off."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    for line in lines[1:]:
        text += (" " if text.endswith((":", ";", ",", ".")) else "; ") + line
    return text


def _codec_hint(fmt: str, exc: BaseException) -> str:
    """For DICOM pixel data that no installed codec can decode (JPEG, JPEG-LS, JPEG 2000 without
    pylibjpeg/gdcm): which extra to install; ``""`` for any other failure."""
    if fmt != "dicom" or not _CODEC_FAILURE.search(str(exc)):
        return ""
    if all(importlib.util.find_spec(name) is not None for name in _CODEC_MODULES):
        return ""  # the extra is installed: the data itself is the problem
    return f" (the DICOM pixel-data codecs are not installed: {DICOM_CODECS_EXTRA})"
