"""A small dilated CNN: a wide receptive field at full resolution for few parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """1D Gaussian of standard deviation ``sigma`` pixels (radius 3 sigma), summing to 1."""
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


class SmoothedResidualNet(nn.Module):
    """Learnt mix of Gaussian-smoothed versions of the input mean, plus a dilated-CNN residual.

    The base ``sum_s softmax(w)_s * G_s(mean_c(x))`` starts as a sensible smoother and its few
    weights are learnt by the same loss as the CNN, so fitting starts near the best Gaussian
    filter and the CNN only learns what a Gaussian cannot (edges, texture).

    Args:
        in_channels: Input channels.
        features: Hidden channels of the residual CNN.
        sigmas: Standard deviations (pixels) of the smoothed versions; 0 = unsmoothed.

    Input ``(B, in_channels, H, W)``; output ``(B, 1, H, W)``.
    """

    def __init__(
        self, in_channels: int, features: int = 32, sigmas: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    ) -> None:
        super().__init__()
        self.sigmas = sigmas
        self.mix = nn.Parameter(torch.zeros(len(sigmas)))
        for i, s in enumerate(sigmas):
            if s > 0:
                self.register_buffer(f"kernel{i}", _gaussian_kernel(s))
        self.residual = DilatedNet(in_channels, 1, features)

    def _blur(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self.sigmas[i] <= 0:
            return x
        k: torch.Tensor = getattr(self, f"kernel{i}")
        r = k.numel() // 2
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(B, 1, H, W)``."""
        mean = x.mean(dim=1, keepdim=True)
        weights = torch.softmax(self.mix, dim=0)
        base = sum(weights[i] * self._blur(mean, i) for i in range(len(self.sigmas)))
        out: torch.Tensor = base + self.residual(x)
        return out
