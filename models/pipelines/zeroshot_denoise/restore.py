"""Give back structure that the slice split removed (numpy/scipy only).

The slice-split estimate of slice ``k`` never sees slice ``k``, so anatomy that changes between
neighbouring slices is missing from it. The residual ``noisy - estimate`` is noise plus that
missing structure. Smoothed in-plane, pure noise stays within a few robust standard deviations;
where it does not, structure is missing and the smoothed residual is added back there (the
smoothed one: adding the raw residual back brings its noise with it, measured -1.8 dB on the
simulated low-dose benchmark against -0.03 dB for the smoothed one).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.ndimage import gaussian_filter

from models.transforms.noise import robust_std


def restore_detail(
    noisy: npt.NDArray[np.float32],
    estimate: npt.NDArray[np.float32],
    sigma_px: float = 1.0,
    low: float = 4.0,
    high: float = 6.0,
) -> tuple[npt.NDArray[np.float32], float]:
    """Blend the smoothed residual back where it is significantly larger than noise.

    Args:
        noisy: Input slices ``(K, H, W)`` (any units, e.g. HU).
        estimate: Slice-split estimate on the same grid and units.
        sigma_px: In-plane Gaussian smoothing of the residual before the test (pixels).
        low: Below ``low`` robust standard deviations nothing is restored.
        high: Above ``high`` the residual is restored entirely (linear ramp in between).

    Returns:
        ``(restored, fraction)``: the blended volume ``(K, H, W)`` float32 and the fraction of
        voxels with a non-zero restoration weight.
    """
    residual = np.asarray(noisy, dtype=np.float32) - estimate
    smooth = gaussian_filter(residual, (0.0, sigma_px, sigma_px))
    centre = float(np.median(smooth))
    scale = robust_std(smooth)
    if scale <= 0.0:
        return estimate.astype(np.float32, copy=True), 0.0
    z = np.abs(smooth - centre) / scale
    weight = np.clip((z - low) / (high - low), 0.0, 1.0).astype(np.float32)
    return (estimate + weight * smooth).astype(np.float32), float(np.mean(weight > 0))
