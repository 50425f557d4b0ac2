"""Shared helpers of the physics tests: a real CT slice, discs, metrics (HU window stated)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from models.physics.lowdose import MU_WATER_PER_MM, estimate_body_mask, hu_to_mu

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
EXAMPLE_CT = DATA / "totalsegmentator" / "example_ct.nii.gz"
HU_WINDOW = (-1000.0, 1000.0)


def disc_image(
    n: int, pixel_mm: float, radius_mm: float, value: float, centre_mm: tuple[float, float] = (0, 0)
) -> np.ndarray:
    """Disc (centre ``(x, y)`` mm) with pixel values = covered area fraction x value (8x8 ss)."""
    ss = 8
    c = ((np.arange(n * ss) + 0.5) / ss - n / 2) * pixel_mm
    yy, xx = np.meshgrid(c, c, indexing="ij")
    inside = (np.hypot(xx - centre_mm[0], yy - centre_mm[1]) < radius_mm).astype(np.float64)
    return (inside.reshape(n, ss, n, ss).mean(axis=(1, 3)) * value).astype(np.float32)


def radius_map(n: int) -> np.ndarray:
    """Distance of each pixel centre from the image centre, in pixels."""
    yy, xx = np.mgrid[:n, :n]
    return np.hypot(xx - (n - 1) / 2, yy - (n - 1) / 2)


def load_ct_slice() -> np.ndarray:
    """Middle axial slice of the TotalSegmentator example CT (HU, 3 mm pixels), 122 x 122.

    Rows along +y (posterior), columns along +x (left), padded with -1024 HU to a square.
    Skips the test when the data or nibabel is missing.
    """
    if not EXAMPLE_CT.exists():
        pytest.skip(f"{EXAMPLE_CT} not available")
    nib = pytest.importorskip("nibabel")
    volume = np.asarray(nib.load(EXAMPLE_CT).dataobj, dtype=np.float32)  # (x, y, z)
    axial = volume[:, :, volume.shape[2] // 2].T
    side = max(axial.shape)
    square = np.full((side, side), -1024.0, dtype=np.float32)
    top, left = (side - axial.shape[0]) // 2, (side - axial.shape[1]) // 2
    square[top : top + axial.shape[0], left : left + axial.shape[1]] = axial
    return square


class SliceMetric:
    """PSNR in HU of attenuation images (1/mm) against a CT slice, in its body mask.

    HU window [-1000, 1000] (values clipped), data range 2000 HU.
    """

    def __init__(self, slice_hu: np.ndarray) -> None:
        self.reference = np.clip(slice_hu, *HU_WINDOW).astype(np.float64)
        self.body = estimate_body_mask(slice_hu)
        self.mu = hu_to_mu(slice_hu)

    def psnr(self, image_mu: np.ndarray) -> float:
        hu = np.clip(1000.0 * (image_mu.astype(np.float64) / MU_WATER_PER_MM - 1.0), *HU_WINDOW)
        mse = float(np.mean((hu[self.body] - self.reference[self.body]) ** 2))
        return 10.0 * math.log10((HU_WINDOW[1] - HU_WINDOW[0]) ** 2 / mse)
