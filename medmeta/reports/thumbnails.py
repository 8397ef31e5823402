"""Thumbnails of scans for the HTML report: an image as it is, a volume as three orthogonal
mid-planes side by side.

Volume convention: a volume oriented by :mod:`medmeta.data.volumes` has voxel axes towards
the patient's Left, Posterior and Superior (``LPS``). Its planes are shown in the radiological
convention: **axial** (the middle slice along S) with the patient's left on the image's right
and anterior at the top; **coronal** (the middle along P) with the patient's left on the right
and superior at the top; **sagittal** (the middle along L) with anterior on the left and
superior at the top. A volume with no geometry (a MedMNIST array, a multi-frame DICOM file) is
shown as stored: the middle slice along each of its axes ``(depth, rows, columns)``, the first
as ``(rows, columns)``, the others with depth downwards.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch

#: Pixels of background between the planes of a volume's thumbnail.
PLANE_GAP = 2


def volume_planes(volume: np.ndarray, oriented: bool = True) -> list[np.ndarray]:
    """``(C, X, Y, Z)`` -> ``[axial, coronal, sagittal]`` display arrays ``(C, rows, columns)``
    (see the module for the conventions); ``oriented=False``: the stored axes' mid-planes."""
    c, x, y, z = volume.shape
    if not oriented:  # (depth, rows, columns) as stored
        return [volume[:, x // 2], volume[:, :, y // 2], volume[:, :, :, z // 2]]
    axial = np.swapaxes(volume[:, :, :, z // 2], 1, 2)  # rows: posterior downwards; columns: towards L
    coronal = np.swapaxes(volume[:, :, y // 2, :], 1, 2)[:, ::-1]  # rows: superior at the top
    sagittal = np.swapaxes(volume[:, x // 2, :, :], 1, 2)[:, ::-1]  # columns: towards posterior
    return [axial, coronal, sagittal]


def montage(planes: list[np.ndarray], gap: int = PLANE_GAP) -> np.ndarray:
    """Planes ``(C, h_i, w_i)`` side by side, top-aligned, ``gap`` pixels of 0 between them."""
    channels, height = planes[0].shape[0], max(p.shape[1] for p in planes)
    width = sum(p.shape[2] for p in planes) + gap * (len(planes) - 1)
    canvas = np.zeros((channels, height, width), dtype=planes[0].dtype)
    column = 0
    for plane in planes:
        canvas[:, : plane.shape[1], column : column + plane.shape[2]] = plane
        column += plane.shape[2] + gap
    return canvas


def oriented(volume: dict | None) -> bool:
    """Whether a scan's thumbnail shows radiological planes: False only for a volume read with
    its axes as stored (no orientation in the file); ``volume`` is its record (None: an image)."""
    return (volume or {}).get("orientation") != "as stored"


def thumbnail_data_uri(image: torch.Tensor, oriented: bool = True) -> str:
    """``(C, H, W)`` or a volume ``(C, X, Y, Z)`` in ``[0, 1]`` -> ``data:image/png;base64,...``."""
    return "data:image/png;base64," + base64.b64encode(thumbnail_png(image, oriented)).decode("ascii")


def saliency_data_uri(image: torch.Tensor, saliency: np.ndarray, oriented: bool = True) -> str:
    """:func:`saliency_png` as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(saliency_png(image, saliency, oriented)).decode("ascii")


#: Colour map of the saliency overlay, and the opacity of its strongest value.
SALIENCY_CMAP = "inferno"
SALIENCY_ALPHA = 0.6
#: The smallest value (a fall of log-odds, in nats) the overlay's full colour stands for: a map
#: whose largest value is below it is drawn fainter, so noise is not shown as evidence.
SALIENCY_FULL_SCALE = 1.0


def saliency_png(image: torch.Tensor, saliency: np.ndarray, oriented: bool = True) -> bytes:
    """A scan ``(C, H, W)`` or ``(C, X, Y, Z)`` in ``[0, 1]`` in gray under its saliency map
    ``(H, W)`` or ``(X, Y, Z)`` (:mod:`medmeta.pipeline.saliency`), as the bytes of an RGB PNG
    laid out as :func:`thumbnail_png` lays out the scan (a volume's mid-planes). The map is
    scaled to its own largest value over the whole scan (at least :data:`SALIENCY_FULL_SCALE`), coloured with :data:`SALIENCY_CMAP` and
    blended in proportion to its value (at most :data:`SALIENCY_ALPHA`): where it is 0 the scan
    shows unchanged. A map of zeros leaves the scan gray."""
    from matplotlib import colormaps
    from PIL import Image

    gray = image.detach().cpu().float().clamp(0, 1).numpy().mean(axis=0, keepdims=True)
    heat = np.asarray(saliency, dtype=np.float32)[None]
    scale = max(float(heat.max()) if heat.size else 0.0, SALIENCY_FULL_SCALE)  # the whole map's, not the planes'
    if gray.ndim == 4:
        gray, heat = montage(volume_planes(gray, oriented)), montage(volume_planes(heat, oriented))
    gray, heat = gray[0], heat[0]
    weight = np.clip(heat / scale, 0, 1)
    colour = colormaps[SALIENCY_CMAP](weight)[..., :3]
    alpha = (SALIENCY_ALPHA * weight)[..., None]
    rgb = (1 - alpha) * gray[..., None] + alpha * colour
    buffer = io.BytesIO()
    Image.fromarray((rgb.clip(0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def thumbnail_png(image: torch.Tensor, oriented: bool = True) -> bytes:
    """``(C, H, W)`` or a volume ``(C, X, Y, Z)`` in ``[0, 1]`` -> the bytes of a PNG file: one
    gray channel when the scan is grayscale (its three channels equal), else RGB."""
    from PIL import Image

    array = (image.detach().cpu().float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    if array.ndim == 4:
        array = montage(volume_planes(array, oriented))
    gray = array.shape[0] == 1 or bool((array[0] == array[1]).all() and (array[0] == array[2]).all())
    pil = Image.fromarray(array[0]) if gray else Image.fromarray(np.ascontiguousarray(np.moveaxis(array[:3], 0, -1)))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()
