"""Noise-level estimation from a single image (no reference needed)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_MAD_TO_STD = 1.0 / 0.6744897501960817


def robust_std(values: npt.NDArray[np.floating]) -> float:
    """Standard deviation from the median absolute deviation (exact for Gaussian values)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        return 0.0
    return float(np.median(np.abs(flat - np.median(flat))) * _MAD_TO_STD)


def diagonal_detail(slices: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """Finest diagonal Haar detail of each 2x2 block.

    Args:
        slices: Shape ``(..., H, W)``; odd trailing rows/columns are dropped.

    Returns:
        ``(a - b - c + d) / 2`` per block, shape ``(..., H // 2, W // 2)``. For white noise of
        standard deviation sigma it has standard deviation sigma; smooth anatomy cancels.
    """
    h, w = slices.shape[-2] // 2 * 2, slices.shape[-1] // 2 * 2
    x = np.asarray(slices[..., :h, :w], dtype=np.float64)
    return (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2


def estimate_noise_std(
    slices: npt.NDArray[np.floating], mask: npt.NDArray[np.bool_] | None = None
) -> float:
    """Robust noise standard deviation (Donoho's MAD of the finest diagonal detail).

    Args:
        slices: Image(s), shape ``(..., H, W)``, in the image's units (HU for CT).
        mask: Optional boolean mask of the same shape; only 2x2 blocks fully inside count
            (e.g. the body, so air outside the patient does not dominate).

    Returns:
        Estimated sigma in the image's units. It is exact for white Gaussian noise; for the
        spatially correlated noise of CT it measures the high-frequency part of the noise, so
        compare it only between images of the same kind (before/after denoising).
    """
    detail = diagonal_detail(slices)
    if mask is not None:
        h, w = detail.shape[-2] * 2, detail.shape[-1] * 2
        m = mask[..., :h, :w]
        inside = m[..., 0::2, 0::2] & m[..., 0::2, 1::2] & m[..., 1::2, 0::2] & m[..., 1::2, 1::2]
        values = detail[inside]
    else:
        values = detail.ravel()
    return robust_std(values)
