"""The two self-supervised splits of one noisy scan.

*Slice split* (stage 1): neighbouring slices are noisy views of nearly the same anatomy whose
noise is independent of the centre slice's (true for 2D-reconstructed slices that do not
overlap). A network that predicts slice ``k`` from slices ``k±1..k±c`` (never seeing ``k``)
trained with MSE against the noisy slice ``k`` converges to an estimate of the *clean* slice
(Noise2Noise), whatever the in-plane noise correlation — the property CT noise needs.

*Pair split* (stage 2, ZS-N2N): the two diagonals of each 2x2 block give two half-resolution
images with (nearly) independent noise; a small CNN predicts the noise of one channel from
the other. Here it also gets the stage-1 estimate as an extra channel, so detail present only in
slice ``k`` (which stage 1 cannot see) is restored from slice ``k`` itself.

Arrays: normalised intensities ``(K, H, W)``; tensors ``(B, C, H, W)``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn


def reflect_index(i: int, n: int) -> int:
    """Reflect an index into ``[0, n)`` without repeating the edge (``-1 -> 1``)."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i = abs(i) % period
    return period - i if i >= n else i


def neighbours(volume: npt.NDArray[np.float32], k: int, context: int) -> npt.NDArray[np.float32]:
    """Slices ``k-c..k-1, k+1..k+c`` (reflected at the ends), shape ``(2c, H, W)``."""
    n = volume.shape[0]
    picks = [reflect_index(k + d, n) for d in range(-context, context + 1) if d != 0]
    return volume[picks]


def context_stack(volume: npt.NDArray[np.float32], k: int, context: int) -> npt.NDArray[np.float32]:
    """Slice ``k`` first, then its ``2c`` neighbours: shape ``(2c + 1, H, W)``."""
    return np.concatenate([volume[k : k + 1], neighbours(volume, k, context)])


# --- stage 1: slice split ------------------------------------------------------------------


def slice_split_predict(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Estimate of the centre slice from its neighbours: ``(B, 2c, H, W)`` -> ``(B, 1, H, W)``."""
    out: torch.Tensor = net(x)
    return out


def slice_split_loss(net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """MSE between the estimate from the neighbours and the noisy centre slice.

    Args:
        net: Slice-split network.
        batch: ``(B, 2c + 1, h, w)``: channel 0 the centre (target), then the neighbours.
    """
    return F.mse_loss(slice_split_predict(net, batch[:, 1:]), batch[:, :1])


# --- stage 2: pair split (ZS-N2N) ------------------------------------------------------------


def pair_downsample(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ZS-N2N pair downsampling: ``(B, C, H, W)`` -> two ``(B, C, H/2, W/2)`` images.

    ``D1`` averages the main diagonal of each 2x2 block, ``D2`` the anti-diagonal.
    """
    c = x.shape[1]
    k1 = torch.tensor([[[[0.5, 0.0], [0.0, 0.5]]]], dtype=x.dtype, device=x.device)
    k2 = torch.tensor([[[[0.0, 0.5], [0.5, 0.0]]]], dtype=x.dtype, device=x.device)
    d1 = F.conv2d(x, k1.repeat(c, 1, 1, 1), stride=2, groups=c)
    d2 = F.conv2d(x, k2.repeat(c, 1, 1, 1), stride=2, groups=c)
    return d1, d2


def pair_split_predict(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Denoised channel 0 of ``x`` ``(B, C, H, W)``: channel 0 minus the predicted noise."""
    out: torch.Tensor = x[:, :1] - net(x)
    return out


def pair_split_loss(net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """ZS-N2N residual + consistency loss for channel 0 of ``batch`` ``(B, C, h, w)``."""
    d1, d2 = pair_downsample(batch)
    den1, den2 = pair_split_predict(net, d1), pair_split_predict(net, d2)
    loss_res = 0.5 * (F.mse_loss(d1[:, :1], den2) + F.mse_loss(d2[:, :1], den1))
    f1, f2 = pair_downsample(pair_split_predict(net, batch))
    loss_cons = 0.5 * (F.mse_loss(den1, f1) + F.mse_loss(den2, f2))
    return loss_res + loss_cons
