"""Occlusion saliency: which region of a case its prediction rests on.

M. D. Zeiler and R. Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014:
hide one region of the scan at a time and watch the predicted condition. Where hiding a region
makes the prediction weaker, that region drove it. It is computed with MONAI's
:class:`~monai.visualize.OcclusionSensitivity` through the head fitted on the support, so it
works for every head and method alike (an embedding head, fine-tuning, MAML, MANN): it needs
only the fitted learner's ``predict_query`` on images, never gradients.

A window of ``1 / SALIENCY_GRID`` of each side (at least one pixel) slides over the scan with
half-window steps (:data:`SALIENCY_OVERLAP`); the region under it is replaced by its own mean
value, which removes its structure but keeps its brightness (a gray or black patch would be a
new object in the scan). A 64 x 64 image takes 49 occluded copies, a 28^3 volume 343, scored
in batches of :data:`SALIENCY_BATCH`.

What is watched is the predicted condition's log-odds against all the others together,
``log p - log(1 - p)`` at the checkpoint's temperature: unlike the probability it does not
saturate, so a confident prediction still shows which region it rests on. Each pixel's value
is the fall of those log-odds averaged over the windows that cover it, clipped at 0 (0: hiding
the pixel's neighbourhood does not weaken the prediction). ``exp`` of the largest value is the
factor by which hiding the most important region divides the prediction's odds.

With a transductive refiner (``--transductive``) the map is the inductive head's (the refiner
would treat the occluded copies of one case as a batch of cases); the predicted condition is
still the refined prediction's.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch
from torch import nn

#: Windows per axis of the scan (a window is this fraction of each side).
SALIENCY_GRID = 4
#: Overlap of neighbouring windows (MONAI's ``overlap``): half a window.
SALIENCY_OVERLAP = 0.5
#: Occluded copies scored per forward pass.
SALIENCY_BATCH = 64


class _LogOdds(nn.Module):
    """A fitted learner as the classifier MONAI occludes: images ``(n, C, *spatial)`` -> each
    condition's log-odds ``(n, n_way)`` against the others, at ``temperature``."""

    def __init__(self, learner, temperature: float):
        super().__init__()
        self.learner = learner
        self.temperature = float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.learner.predict_query(images).double() / self.temperature
        # log-odds of each condition against the others: log p - log(1 - p)
        others = torch.stack([torch.cat([z[:, :k], z[:, k + 1 :]], 1).logsumexp(1) for k in range(z.shape[1])], 1)
        return z - others


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


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A MONAI ``MetaTensor`` as a plain tensor (no metadata tracking in the arithmetic)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


def window_size(spatial: tuple[int, ...], grid: int = SALIENCY_GRID) -> tuple[int, ...]:
    """The occluding window for a scan of ``spatial`` size: ``ceil(side / grid)`` per axis."""
    return tuple(max(1, math.ceil(side / grid)) for side in spatial)


@torch.no_grad()
def occlusion_saliency(
    learner, images: torch.Tensor, predicted: np.ndarray, temperature: float, device: torch.device | str = "cpu",
    grid: int = SALIENCY_GRID,
) -> tuple[np.ndarray, np.ndarray]:
    """Saliency of each case's prediction (see the module).

    Args:
        learner: fitted to the support (``fit_support`` done), scoring images with ``predict_query``.
        images: ``(n_query, C, *spatial)`` the cases, 2D or 3D.
        predicted: ``(n_query,)`` the index of each case's predicted condition.
        temperature: divides the logits before the softmax.

    Returns:
        ``(n_query, *spatial)`` float32 maps: the fall of the predicted condition's log-odds
        when the region around each pixel is hidden (>= 0), and ``(n_query,)`` each map's
        largest value.
    """
    from monai.visualize import OcclusionSensitivity

    device = torch.device(device)
    spatial = tuple(images.shape[2:])
    classifier = _LogOdds(learner, temperature).eval()  # else MONAI's eval_mode, leaving, would set it (and the learner) training
    occlusion = OcclusionSensitivity(
        classifier, mask_size=window_size(spatial, grid), n_batch=SALIENCY_BATCH, verbose=False, mode="mean_patch",
        overlap=SALIENCY_OVERLAP, activate=False,
    )
    maps = np.zeros((len(images), *spatial), dtype=np.float32)
    with _inductive(learner), warnings.catch_warnings():
        # MONAI 1.6 indexes with lists, which torch warns about; the values are unaffected
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
        for i, image in enumerate(images):
            x = image[None].to(device)
            target = int(predicted[i])
            base = classifier(x)[0, target]
            occluded = _plain(occlusion(x)[0])[0, target]  # (*spatial): the target's log-odds, region hidden
            maps[i] = (base - occluded.double()).clamp_min(0).float().cpu().numpy()
    peaks = maps.reshape(len(maps), -1).max(axis=1) if len(maps) else np.zeros(0, dtype=np.float32)
    return maps, peaks
