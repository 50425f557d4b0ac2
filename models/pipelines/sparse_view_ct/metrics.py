"""Image quality against the input in a body mask, HU window stated (numpy/scipy only).

Both images are clipped to :data:`HU_WINDOW` before comparison; the data range is its width.
PSNR pools the squared error of every body pixel of the volume; SSIM is the mean of the SSIM
map (Gaussian window sigma 1.5 px, truncated at 3.5 sigma, K1 = 0.01, K2 = 0.03, sample
covariance: the choices of ``skimage.metrics.structural_similarity(gaussian_weights=True)``),
computed per slice in 2D and averaged over the body pixels.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy import ndimage

HU_WINDOW: tuple[float, float] = (-1000.0, 1000.0)
"""HU range both images are clipped to before PSNR/SSIM."""

_SIGMA, _TRUNCATE = 1.5, 3.5


Window = tuple[float, float]
"""``(low, high)`` intensity range both images are clipped to; its width is the data range."""


def _clip(x: npt.NDArray[np.floating], window: Window = HU_WINDOW) -> npt.NDArray[np.float64]:
    return np.clip(np.asarray(x, dtype=np.float64), *window)


def psnr_db(
    image_hu: npt.NDArray[np.floating],
    reference_hu: npt.NDArray[np.floating],
    mask: npt.NDArray[np.bool_],
    window: Window = HU_WINDOW,
) -> float:
    """PSNR (dB) of ``image_hu`` against ``reference_hu`` in ``mask`` (any equal shapes).

    ``window`` is the clip range (default the HU window; another range for non-HU images).
    Returns ``inf`` for identical images and ``nan`` for an empty mask.
    """
    if not mask.any():
        return math.nan
    err = _clip(image_hu, window)[mask] - _clip(reference_hu, window)[mask]
    mse = float(np.mean(err**2))
    span = window[1] - window[0]
    return math.inf if mse == 0.0 else 10.0 * math.log10(span**2 / mse)


def ssim_map(
    image_hu: npt.NDArray[np.floating],
    reference_hu: npt.NDArray[np.floating],
    window: Window = HU_WINDOW,
) -> npt.NDArray[np.float64]:
    """SSIM map of two ``(H, W)`` slices clipped to ``window``, shape ``(H, W)``."""
    x, y = _clip(image_hu, window), _clip(reference_hu, window)
    span = window[1] - window[0]
    c1, c2 = (0.01 * span) ** 2, (0.03 * span) ** 2
    radius = int(_TRUNCATE * _SIGMA + 0.5)
    n_win = (2 * radius + 1) ** 2
    cov_norm = n_win / (n_win - 1.0)

    def blur(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(ndimage.gaussian_filter(a, _SIGMA, mode="reflect", truncate=_TRUNCATE))

    ux, uy = blur(x), blur(y)
    vx = cov_norm * (blur(x * x) - ux * ux)
    vy = cov_norm * (blur(y * y) - uy * uy)
    vxy = cov_norm * (blur(x * y) - ux * uy)
    num = (2 * ux * uy + c1) * (2 * vxy + c2)
    den = (ux**2 + uy**2 + c1) * (vx + vy + c2)
    return np.asarray(num / den)


def ssim_in_mask(
    image_hu: npt.NDArray[np.floating],
    reference_hu: npt.NDArray[np.floating],
    mask: npt.NDArray[np.bool_],
    window: Window = HU_WINDOW,
) -> float:
    """Mean SSIM over the mask of ``(K, H, W)`` volumes (2D SSIM per slice); ``nan`` if empty."""
    values = [
        ssim_map(a, b, window)[m] for a, b, m in zip(image_hu, reference_hu, mask, strict=True)
    ]
    pooled = np.concatenate(values) if values else np.zeros(0)
    return float(pooled.mean()) if pooled.size else math.nan
