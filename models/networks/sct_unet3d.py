"""3D variant of the cbct-to-sct UNet: 3D patches in, an HU correction of the same patch out.

Issue 7 asks to measure and choose between 2.5D (neighbouring slices as channels, the shipped
networks of :mod:`models.networks.glfc`) and 3D patches. This is the 3D side of that
comparison: the same design as the plain 2.5D UNet (two 3 x 3 x 3 convolutions per level with
GroupNorm, SiLU and a 1 x 1 x 1 residual path, 2x max-pooling in all three axes, transposed
convolutions and concatenated skips, a zero-initialised head predicting a residual), with 3D
convolutions, and channel widths chosen for about the same parameter count (a 3 x 3 x 3
kernel holds three times the weights of a 3 x 3 one).

Tensors are ``(batch, 1, slices, rows, cols)`` on the canonical grid
(:data:`models.training.sct_data.CANONICAL`: axial slices along the first spatial axis),
intensities normalised HU (``HU / 1000``); every spatial size must be a multiple of
``2 ** (levels - 1)``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ConvBlock3d(nn.Module):
    """Two 3 x 3 x 3 convolutions with GroupNorm and SiLU, and a 1 x 1 x 1 residual path."""

    def __init__(self, c_in: int, c_out: int) -> None:
        """Build the block.

        Args:
            c_in: Input channels.
            c_out: Output channels.
        """
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(c_in, c_out, 3, padding=1, bias=False),
            _norm(c_out),
            nn.SiLU(),
            nn.Conv3d(c_out, c_out, 3, padding=1, bias=False),
            _norm(c_out),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv3d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, c_in, D, H, W)`` -> ``(B, c_out, D, H, W)``."""
        return F.silu(self.body(x) + self.skip(x))


class SCTUNet3D(nn.Module):
    """3D UNet predicting an HU correction of a CBCT patch (the 3D baseline of issue 7).

    ``forward(x)``: ``x`` ``(B, 1, D, H, W)`` normalised CBCT; returns ``(B, 1, D, H, W)``:
    the CBCT plus the predicted correction (an untrained network is the identity).
    """

    dims = 3
    """Spatial dimensions of a sample (the 2.5D networks have 2)."""

    def __init__(self, features: tuple[int, ...] = (16, 32, 48, 80)) -> None:
        """Build the network.

        Args:
            features: Channels per resolution level (first: full resolution).
        """
        super().__init__()
        self.levels = len(features)
        self.encoders = nn.ModuleList()
        c_in = 1
        for c_out in features:
            self.encoders.append(ConvBlock3d(c_in, c_out))
            c_in = c_out
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for lo, hi in itertools.pairwise(features):
            self.ups.append(nn.ConvTranspose3d(hi, lo, 2, stride=2))
            self.decoders.append(ConvBlock3d(2 * lo, lo))
        self.head = nn.Conv3d(features[0], 1, 1)
        nn.init.zeros_(self.head.weight)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` -> ``(B, 1, D, H, W)`` (normalised sCT)."""
        skips = []
        h = x
        for level, enc in enumerate(self.encoders):
            if level:
                h = F.max_pool3d(h, 2)
            h = enc(h)
            skips.append(h)
        h = skips[-1]
        for level in range(len(self.decoders) - 1, -1, -1):
            h = self.ups[level](h)
            h = self.decoders[level](torch.cat([h, skips[level]], dim=1))
        return x + self.head(h)
