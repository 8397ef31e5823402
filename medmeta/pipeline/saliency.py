"""Occlusion saliency: which region of a case its prediction rests on.

M. D. Zeiler and R. Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014:
hide one region of the scan at a time and watch the predicted condition. Where hiding a region
makes the prediction weaker, that region drove it. It goes through the head fitted on the
support, so it works for every head and method alike (an embedding head, fine-tuning, MAML,
MANN): it needs only the fitted learner's ``predict_query`` on images, never gradients.

The windows are MONAI's sliding-window grid (:func:`monai.data.utils.dense_patch_slices`): a
window of ``1 / SALIENCY_GRID`` of each side (at least one pixel) in half-window steps; a 64 x 64
image has 49 windows, a 16^3 volume 343. Each window in turn is replaced by its own mean value,
channel by channel, which removes its structure but keeps its brightness (a gray or black
patch would be a new object in the scan). MONAI's ``OcclusionSensitivity`` is not used: in
MONAI 1.6.1 its ``mean_patch`` mode multiplies the window by its mean instead (``predictor``
unpacks ``constant_occlusion``'s ``(mul, add)`` as ``(add, mul)``), and a callable mode is
refused.

:func:`occlusion_logits` runs in the head, with the learner fitted on the full support, and
keeps each window's logits ``(n_windows, n_way)`` per case (a few hundred numbers).
:func:`saliency_maps` turns them into maps once the temperature is known, in the units of the
page's probabilities (with ``--temperature-source support``, the posterior's summary
temperature, while the page averages the probabilities over the posterior): what is watched is
the predicted condition's log-odds against all the others together, ``log p - log(1 - p)``,
at that temperature. Unlike the probability the
log-odds do not saturate, so a confident prediction still shows which region it rests on. A
pixel's value is the fall of those log-odds averaged over the windows that cover it, clipped
at 0 (0: hiding its neighbourhood does not weaken the prediction); the case's ``peak`` is the
largest fall that hiding one window causes, so ``exp(peak)`` is the factor by which hiding that
window divides the prediction's odds.

With a transductive refiner (``--transductive``) the windows are scored by the inductive head
(the refiner would treat the occluded copies of one case as a batch of cases) and the map
follows the refined prediction's condition, which the inductive head may rank otherwise.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

#: Windows per axis of the scan (a window is this fraction of each side).
SALIENCY_GRID = 4
#: Occluded copies scored per forward pass.
SALIENCY_BATCH = 64


@dataclass
class OcclusionScores:
    """The head's logits of each case with each window hidden.

    Attributes:
        windows: the windows, each a tuple of slices over the spatial axes.
        spatial: the scans' spatial shape.
        base: ``(n_query, n_way)`` float64 logits of the scans themselves.
        occluded: ``(n_query, n_windows, n_way)`` float64 logits with each window hidden.
    """

    windows: list[tuple[slice, ...]]
    spatial: tuple[int, ...]
    base: np.ndarray
    occluded: np.ndarray


def window_size(spatial: tuple[int, ...], grid: int = SALIENCY_GRID) -> tuple[int, ...]:
    """The occluding window for a scan of ``spatial`` size: ``ceil(side / grid)`` per axis."""
    return tuple(max(1, math.ceil(side / grid)) for side in spatial)


def occlusion_windows(spatial: tuple[int, ...], grid: int = SALIENCY_GRID) -> list[tuple[slice, ...]]:
    """The windows over a scan of ``spatial`` size: :func:`window_size` windows in half-window
    steps (at least one pixel), the last of each axis flush with its end (MONAI's grid)."""
    from monai.data.utils import dense_patch_slices

    size = window_size(spatial, grid)
    step = tuple(max(1, s // 2) for s in size)
    return [tuple(slice(int(s.start), int(s.stop)) for s in window) for window in dense_patch_slices(spatial, size, step)]


@contextlib.contextmanager
def _inductive(learner):
    """``learner`` without its transductive refiner, if it has one, for the duration."""
    refiner = getattr(learner, "refiner", None)
    if refiner is None:
        yield
        return
    learner.refiner = None
    try:
        yield
    finally:
        learner.refiner = refiner


def hide(image: torch.Tensor, window: tuple[slice, ...]) -> torch.Tensor:
    """A copy of ``image`` ``(C, *spatial)`` with ``window`` replaced by its own mean, channel by channel."""
    hidden = image.clone()
    region = hidden[(slice(None), *window)]
    region[...] = region.flatten(1).mean(dim=1).view(-1, *([1] * (region.dim() - 1)))
    return hidden


@torch.no_grad()
def occlusion_logits(
    learner, images: torch.Tensor, device: torch.device | str = "cpu", grid: int = SALIENCY_GRID,
    batch_size: int = SALIENCY_BATCH,
) -> OcclusionScores:
    """Score each case of ``images`` ``(n_query, C, *spatial)`` with each window hidden, through
    ``learner`` fitted to the support (``fit_support`` done; its ``predict_query`` on images)."""
    device = torch.device(device)
    spatial = tuple(images.shape[2:])
    windows = occlusion_windows(spatial, grid)
    base, occluded = [], []
    with _inductive(learner):
        for image in images:
            image = image.to(device)
            base.append(learner.predict_query(image[None]).double().cpu())
            parts = []
            for start in range(0, len(windows), batch_size):
                copies = torch.stack([hide(image, window) for window in windows[start : start + batch_size]])
                parts.append(learner.predict_query(copies).double().cpu())
            occluded.append(torch.cat(parts))
    n_way = base[0].shape[1] if base else 0
    return OcclusionScores(
        windows, spatial, torch.cat(base).numpy() if base else np.zeros((0, n_way)),
        torch.stack(occluded).numpy() if occluded else np.zeros((0, len(windows), n_way)),
    )


def log_odds(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``(..., n_way)`` logits -> each condition's log-odds against the others at ``temperature``:
    ``z_k - logsumexp_{j != k} z_j`` of ``z = logits / temperature``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if z.shape[-1] < 2:  # one condition: nothing to weigh it against
        return np.full_like(z, np.inf)
    out = np.empty_like(z)
    for k in range(z.shape[-1]):
        others = np.delete(z, k, axis=-1)
        peak = others.max(axis=-1, keepdims=True)
        out[..., k] = z[..., k] - (peak[..., 0] + np.log(np.exp(others - peak).sum(axis=-1)))
    return out


def saliency_maps(scores: OcclusionScores, predicted: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Maps and peaks of the cases (see the module) at ``temperature``.

    Args:
        predicted: ``(n_query,)`` the index of each case's predicted condition.

    Returns:
        ``(n_query, *spatial)`` float32 maps (>= 0) and ``(n_query,)`` float64 peaks (>= 0).
    """
    n = len(scores.base)
    rows = np.arange(n)
    target = np.asarray(predicted, dtype=int)
    base = log_odds(scores.base, temperature)[rows, target]  # (n,)
    hidden = log_odds(scores.occluded, temperature)[rows, :, target]  # (n, n_windows)
    fall = base[:, None] - hidden
    total = np.zeros((n, *scores.spatial))
    cover = np.zeros(scores.spatial)
    for w, window in enumerate(scores.windows):
        total[(slice(None), *window)] += fall[:, w].reshape(n, *([1] * len(scores.spatial)))
        cover[window] += 1
    maps = np.clip(total / cover, 0, None).astype(np.float32)
    peaks = np.clip(fall.max(axis=1), 0, None) if fall.size else np.zeros(n)
    return maps, peaks
