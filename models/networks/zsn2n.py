"""The small CNN of Zero-Shot Noise2Noise (Mansour & Heckel, CVPR 2023), with context channels."""

from __future__ import annotations

import torch
from torch import nn


class ZSN2NNet(nn.Module):
    """Two 3x3 convolutions and a 1x1 head that predict the *noise* of the centre channel.

    Args:
        in_channels: Input channels (``2 * context + 1`` slices).
        out_channels: Predicted channels (1: the centre slice).
        features: Hidden channels (48 in the paper).

    Input ``(B, in_channels, H, W)``; output ``(B, out_channels, H, W)``; any ``H, W``.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, features: int = 48) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, features, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(features, features, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(features, out_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the noise estimate, shape ``(B, out_channels, H, W)``."""
        out: torch.Tensor = self.body(x)
        return out
