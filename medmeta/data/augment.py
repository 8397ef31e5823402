"""Training-time augmentation with MONAI transforms, seeded per episode for exact resumption."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import RandomizableTransform

from medmeta.data.plain_tensors import plain_tensors

AUGMENTATIONS = ("none", "light", "strong")


class Augmenter:
    """Label-preserving random transforms applied image by image to a batch ``(n, C, H, W)``
    (``(n, C, D, H, W)`` with ``spatial_dims=3``).

    Images: ``light`` is flips, 90-degree rotations and a mild affine (rotation, scale);
    ``strong`` adds contrast, Gaussian noise and a wider affine. Flips and rotations suit
    dermoscopy, microscopy and most cross-sectional slices; use ``none`` where orientation
    carries meaning. Volumes: no flips and no 90-degree turns, because a volume's axes carry
    anatomy (a mirrored right kidney is a left one); ``light`` is a mild 3D affine (a small
    rotation about each axis, scale, shift), ``strong`` a wider one with contrast and noise.
    The random state is reset from ``(seed, step)`` before every batch, so a resumed run
    augments exactly as an uninterrupted one.
    """

    def __init__(self, level: str = "light", seed: int = 0, grayscale: float = 0.0, spatial_dims: int = 2):
        if level not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {level!r}")
        if not 0.0 <= grayscale <= 1.0:
            raise ValueError(f"grayscale probability must be in [0, 1], got {grayscale!r}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.level, self.seed, self.grayscale, self.spatial_dims = level, seed, float(grayscale), spatial_dims
        build = self._build if spatial_dims == 2 else self._build_3d
        self._transform = None if level == "none" and grayscale == 0 else build(level, grayscale)

    @staticmethod
    def _build_3d(level: str, grayscale: float = 0.0):
        from monai.transforms import RandAffine

        strong = level == "strong"
        rotate, scale, shift = (0.25, 0.15, 3) if strong else (0.12, 0.08, 2)
        transforms = [] if level == "none" else [
            RandAffine(
                prob=0.7, rotate_range=(rotate,) * 3, scale_range=(scale,) * 3, translate_range=(shift,) * 3,
                padding_mode="border",
            )
        ]
        return _compose(transforms, strong, grayscale)

    @staticmethod
    def _build(level: str, grayscale: float = 0.0):
        from monai.transforms import RandAffine, RandFlip, RandRotate90

        strong = level == "strong"
        transforms = [] if level == "none" else [
            RandFlip(prob=0.5, spatial_axis=0),
            RandFlip(prob=0.5, spatial_axis=1),
            RandRotate90(prob=0.5, max_k=3),
            RandAffine(
                prob=0.7,
                rotate_range=0.4 if strong else 0.2,
                scale_range=0.2 if strong else 0.1,
                translate_range=6 if strong else 3,
                padding_mode="reflection",
            ),
        ]
        return _compose(transforms, strong, grayscale)

    def __call__(self, images: torch.Tensor, step: int) -> torch.Tensor:
        if self._transform is None:
            return images
        self._transform.set_random_state(seed=int(np.random.SeedSequence([self.seed, step]).generate_state(1)[0]))
        with plain_tensors():
            out = torch.stack([torch.as_tensor(self._transform(img)) for img in images])
        return out.clamp_(0.0, 1.0).as_subclass(torch.Tensor)


def _compose(spatial: list, strong: bool, grayscale: float):
    """The spatial transforms, then (``strong``) contrast and Gaussian noise, then the
    grayscale draw, as one MONAI ``Compose``."""
    from monai.transforms import Compose, RandAdjustContrast, RandGaussianNoise

    transforms = list(spatial)
    if strong:
        transforms += [RandAdjustContrast(prob=0.3, gamma=(0.7, 1.4)), RandGaussianNoise(prob=0.2, std=0.03)]
    if grayscale > 0:
        transforms.append(RandGrayscale(prob=grayscale))
    return Compose(transforms)


class RandGrayscale(RandomizableTransform):
    """With probability ``prob``, replace every channel of a ``(C, *spatial)`` image by its
    luminance (ITU-R BT.601 weights for RGB, the channel mean otherwise), so that features do not
    rest on colour alone (for a modality met only in grayscale at test time). Seeded with the
    other transforms by ``Compose.set_random_state``."""

    def __call__(self, img):
        self.randomize(None)
        if not self._do_transform:
            return img
        img = torch.as_tensor(img)
        if img.shape[0] == 3:
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=img.dtype, device=img.device)
            gray = (img * weights.view(3, *([1] * (img.ndim - 1)))).sum(0, keepdim=True)
        else:
            gray = img.mean(0, keepdim=True)
        return gray.expand_as(img).clone()
