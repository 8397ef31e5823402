"""Training-time augmentation with MONAI transforms, seeded per episode for exact resumption."""

from __future__ import annotations

import numpy as np
import torch

AUGMENTATIONS = ("none", "light", "strong")


class Augmenter:
    """Label-preserving random transforms applied image by image to a batch ``(n, C, H, W)``.

    ``light``: flips, 90-degree rotations and a mild affine (rotation, scale); ``strong`` adds
    contrast, Gaussian noise and a wider affine. Flips and rotations suit dermoscopy, microscopy
    and most cross-sectional slices; use ``none`` where orientation carries meaning. The random
    state is reset from ``(seed, step)`` before every batch, so a resumed run augments exactly
    as an uninterrupted one.
    """

    def __init__(self, level: str = "light", seed: int = 0):
        if level not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {level!r}")
        self.level, self.seed = level, seed
        self._transform = None if level == "none" else self._build(level)

    @staticmethod
    def _build(level: str):
        from monai.transforms import (
            Compose,
            RandAdjustContrast,
            RandAffine,
            RandFlip,
            RandGaussianNoise,
            RandRotate90,
        )

        strong = level == "strong"
        transforms = [
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
        if strong:
            transforms += [RandAdjustContrast(prob=0.3, gamma=(0.7, 1.4)), RandGaussianNoise(prob=0.2, std=0.03)]
        return Compose(transforms)

    def __call__(self, images: torch.Tensor, step: int) -> torch.Tensor:
        if self._transform is None:
            return images
        self._transform.set_random_state(seed=int(np.random.SeedSequence([self.seed, step]).generate_state(1)[0]))
        out = torch.stack([torch.as_tensor(self._transform(img)) for img in images])
        return out.clamp_(0.0, 1.0).as_subclass(torch.Tensor)
