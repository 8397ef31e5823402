"""Conv-4: the standard few-shot backbone (Vinyals et al. 2016; Snell et al. 2017)."""

from __future__ import annotations

import torch
from torch import nn

from medmeta.backbones.layers import conv, global_avg_pool, max_pool, norm
from medmeta.backbones.registry import register_backbone


@register_backbone("conv4")
class Conv4(nn.Module):
    """Four blocks of [conv3x3-``hidden``, norm, ReLU, maxpool2], then global average pooling.

    Each block runs the max-pool before the ReLU: the same function (ReLU is monotone, so it
    commutes with a maximum; values and gradients are identical, and so are the parameter names),
    with the ReLU and its backward pass on a quarter of the values.

    Args:
        in_channels: image channels (1 or 3).
        spatial_dims: 2 for images, 3 for volumes.
        hidden: channels of every block (64 in the papers).
        n_blocks: number of blocks.
        norm_kind: ``batch``, ``instance`` or ``group`` (see :func:`~medmeta.backbones.layers.norm`).

    ``forward`` maps ``(batch, in_channels, *spatial)`` to ``(batch, num_features)``.
    """

    def __init__(self, in_channels: int = 3, spatial_dims: int = 2, hidden: int = 64, n_blocks: int = 4, norm_kind: str = "batch"):
        super().__init__()
        blocks = []
        channels = in_channels
        for _ in range(n_blocks):
            blocks += [
                conv(spatial_dims, channels, hidden, bias=norm_kind != "batch"),
                norm(norm_kind, spatial_dims, hidden),
                max_pool(spatial_dims),
                nn.ReLU(inplace=True),
            ]
            channels = hidden
        self.features = nn.Sequential(*blocks)
        self.pool = global_avg_pool(spatial_dims)
        self.num_features = hidden

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, hidden, *spatial / 2**n_blocks)`` feature map."""
        return self.features(x)

    def stages(self) -> list[nn.Module]:
        """The blocks in order (views sharing this model's modules): ``forward_features`` is
        their composition. Lets an adaptation fine-tune only the last ones."""
        return [self.features[i : i + 4] for i in range(0, len(self.features), 4)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x)).flatten(1)
