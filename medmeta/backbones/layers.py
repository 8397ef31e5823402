"""Dimension-agnostic layer builders shared by the backbones (2D and 3D share code)."""

from __future__ import annotations

from monai.networks.layers import Conv, Norm, Pool
from torch import nn

NORMS = ("batch", "instance", "group")


def conv(spatial_dims: int, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, bias: bool = False) -> nn.Module:
    return Conv[Conv.CONV, spatial_dims](in_ch, out_ch, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=bias)


def norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    """``batch``: BatchNorm; ``instance``: per-image, affine InstanceNorm (no running statistics,
    so nothing leaks across images or episodes); ``group``: GroupNorm with up to 8 groups."""
    if kind == "batch":
        return Norm[Norm.BATCH, spatial_dims](channels)
    if kind == "instance":
        return Norm[Norm.INSTANCE, spatial_dims](channels, affine=True)
    if kind == "group":
        groups = max(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def max_pool(spatial_dims: int, kernel: int = 2) -> nn.Module:
    return Pool[Pool.MAX, spatial_dims](kernel_size=kernel, ceil_mode=True)


def global_avg_pool(spatial_dims: int) -> nn.Module:
    return Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
