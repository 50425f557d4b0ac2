"""What the pipelines that simulate a scan of a CT volume share (numpy only).

``sparse-view-ct`` (input (b)) and ``zeroshot-denoise`` (``simulate_i0``) both take a CT volume
in HU as the ground truth of a simulated scan: the same checks refuse what cannot be simulated,
and the same figures compare their reconstructions with that input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from models.errors import InputRejected
from models.physics.lowdose import BODY_THRESHOLD_HU, estimate_body_mask
from models.pipelines.sparse_view_ct.metrics import HU_WINDOW, psnr_db, ssim_in_mask
from models.volume import Volume

MIN_PIXELS = 16
"""Smallest slice side (pixels) whose scan is simulated."""


def check_ct_volume(volume: Volume, purpose: str) -> float:
    """Refuse a volume whose scan cannot be simulated, before any projection.

    Args:
        volume: The input, ``(K, H, W)``.
        purpose: Start of the messages, e.g. ``"sparse-view-ct simulates a scan of"``.

    Returns:
        The in-plane pixel size (mm).

    Raises:
        InputRejected: Not CT in HU, NaN/infinity, slices smaller than :data:`MIN_PIXELS`, or
            pixels that are not square (the projector needs square pixels: resample first).
    """
    if volume.modality != "CT" or volume.units != "HU":
        raise InputRejected(
            f"{purpose} a CT volume in HU; the input is modality {volume.modality!r} with "
            f"units {volume.units!r}"
        )
    _, h, w = volume.shape
    if min(h, w) < MIN_PIXELS:
        raise InputRejected(
            f"slices of {h}x{w} pixels are too small to simulate a scan of "
            f"(min {MIN_PIXELS}x{MIN_PIXELS})"
        )
    if not np.all(np.isfinite(volume.array)):
        raise InputRejected("the CT volume contains NaN or infinite values")
    _, row_mm, col_mm = volume.spacing
    if not math.isclose(row_mm, col_mm, rel_tol=1e-3):
        raise InputRejected(
            f"pixels are {row_mm:.4g} x {col_mm:.4g} mm; the projector needs square pixels, "
            "resample the slices in-plane first"
        )
    return float(col_mm)


def quality_against_input(
    reference_hu: npt.NDArray[np.float32], images: Mapping[str, npt.NDArray[np.float32]]
) -> dict[str, Any]:
    """PSNR/SSIM of each ``(K, H, W)`` HU image against the input in its body mask.

    Returns:
        ``<name>_psnr_db`` and ``<name>_ssim`` per image (``None`` where not finite: an empty
        body mask or an exact match), and how they were measured (mask, HU window).
    """
    mask = estimate_body_mask(reference_hu)
    out: dict[str, Any] = {
        "metric_reference": "the input volume (simulation mode: it is the ground truth)",
        "metric_mask": f"body: largest region > {BODY_THRESHOLD_HU:g} HU per slice, holes filled",
        "metric_window_hu": list(HU_WINDOW),
        "body_fraction": float(mask.mean()),
    }
    for name, image in images.items():
        for key, value in (
            (f"{name}_psnr_db", psnr_db(image, reference_hu, mask)),
            (f"{name}_ssim", ssim_in_mask(image, reference_hu, mask)),
        ):
            out[key] = value if math.isfinite(value) else None  # JSON has no inf/nan
    return out
