"""ResNet-12 (Oreshkin et al. 2018, TADAM; Lee et al. 2019, MetaOptNet)."""

from __future__ import annotations

import torch
from torch import nn

from medmeta.backbones.layers import conv, global_avg_pool, max_pool, norm
from medmeta.backbones.registry import register_backbone


class _ResidualBlock(nn.Module):
    """Three conv3x3-norm layers (LeakyReLU between), a 1x1 projected shortcut, then maxpool2."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, norm_kind: str):
        super().__init__()
        layers = []
        for i in range(3):
            layers += [conv(spatial_dims, in_ch if i == 0 else out_ch, out_ch), norm(norm_kind, spatial_dims, out_ch)]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1, inplace=True))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(conv(spatial_dims, in_ch, out_ch, kernel=1), norm(norm_kind, spatial_dims, out_ch))
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.pool = max_pool(spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.body(x) + self.shortcut(x)))


@register_backbone("resnet12")
class ResNet12(nn.Module):
    """Four residual blocks of widths ``channels``, then global average pooling.

    Args:
        in_channels: image channels.
        spatial_dims: 2 for images, 3 for volumes.
        channels: block widths; the papers use ``(64, 160, 320, 640)``.
        norm_kind: ``batch``, ``instance`` or ``group``.

    ``forward`` maps ``(batch, in_channels, *spatial)`` to ``(batch, channels[-1])``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        spatial_dims: int = 2,
        channels: tuple[int, ...] | list[int] = (64, 160, 320, 640),
        norm_kind: str = "batch",
    ):
        super().__init__()
        widths = [in_channels, *channels]
        self.blocks = nn.Sequential(*[_ResidualBlock(spatial_dims, a, b, norm_kind) for a, b in zip(widths[:-1], widths[1:])])
        self.pool = global_avg_pool(spatial_dims)
        self.num_features = int(channels[-1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def stages(self) -> list[nn.Module]:
        """The residual blocks in order: ``forward_features`` is their composition."""
        return list(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x)).flatten(1)
