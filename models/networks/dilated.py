"""A small dilated CNN: a wide receptive field at full resolution for few parameters."""

from __future__ import annotations

import torch
from torch import nn


class DilatedNet(nn.Module):
    """3x3 convolutions with growing dilation, LeakyReLU, then a 1x1 head.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        features: Hidden channels.
        dilations: Dilation of each 3x3 layer; the default (1, 2, 4, 8, 1) sees 33x33 pixels.

    Input ``(B, in_channels, H, W)``; output ``(B, out_channels, H, W)``; any ``H, W``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 1,
        features: int = 32,
        dilations: tuple[int, ...] = (1, 2, 4, 8, 1),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for d in dilations:
            layers += [nn.Conv2d(channels, features, 3, padding=d, dilation=d), nn.LeakyReLU(0.2)]
            channels = features
        layers.append(nn.Conv2d(channels, out_channels, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(B, out_channels, H, W)``."""
        out: torch.Tensor = self.body(x)
        return out
