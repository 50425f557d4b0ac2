"""SynthRAD-style image metrics of a synthetic CT against a reference CT inside a mask.

The definitions follow the SynthRAD2023 challenge's evaluation (Huijben et al., 2024):

* both images are clipped to :data:`HU_CLIP` = [-1024, 3000] HU; the data range is its width,
  :data:`DATA_RANGE` = 4024 HU;
* **MAE** (HU): mean absolute difference over the mask voxels;
* **PSNR** (dB): ``10 log10(DATA_RANGE^2 / MSE)`` with the MSE over the mask voxels;
* **SSIM**: voxels outside the mask are set to -1024 HU in both images, both are shifted by
  +1024 HU (non-negative), ``skimage.metrics.structural_similarity`` computes the 3D SSIM map
  (7-voxel uniform window, K1 = 0.01, K2 = 0.03, ``data_range=4024``, ``full=True``) and the
  map is averaged over the mask voxels at least 3 voxels from the array border (skimage's own
  crop). The window counts voxels, not mm.

The evaluation mask (:func:`evaluation_mask`) is the reference CT's body inside the CBCT field
of view and inside the reference's own extent.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
from skimage.metrics import structural_similarity

from models.pipelines.cbct_to_sct.masks import body_mask

HU_CLIP: tuple[float, float] = (-1024.0, 3000.0)
"""HU range both images are clipped to before every metric."""

DATA_RANGE = HU_CLIP[1] - HU_CLIP[0]
"""PSNR peak and SSIM data range: 4024 HU."""

SSIM_WINDOW = 7
"""Side (voxels) of skimage's default uniform SSIM window."""

_CROP = (SSIM_WINDOW - 1) // 2


def _clipped(x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    return np.clip(np.asarray(x, dtype=np.float64), *HU_CLIP)


def mae_hu(
    image: npt.NDArray[Any], reference: npt.NDArray[Any], mask: npt.NDArray[np.bool_]
) -> float:
    """Mean absolute error (HU) in ``mask`` after clipping; ``nan`` for an empty mask."""
    if not mask.any():
        return math.nan
    return float(np.mean(np.abs(_clipped(image[mask]) - _clipped(reference[mask]))))


def psnr_db(
    image: npt.NDArray[Any], reference: npt.NDArray[Any], mask: npt.NDArray[np.bool_]
) -> float:
    """PSNR (dB, peak :data:`DATA_RANGE`) in ``mask``; ``inf`` if identical, ``nan`` if empty."""
    if not mask.any():
        return math.nan
    mse = float(np.mean((_clipped(image[mask]) - _clipped(reference[mask])) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(DATA_RANGE**2 / mse)


def ssim_in_mask(
    image: npt.NDArray[Any], reference: npt.NDArray[Any], mask: npt.NDArray[np.bool_]
) -> float:
    """3D SSIM averaged in ``mask`` (see the module docstring); ``nan`` if it cannot be had.

    Args:
        image: ``(K, J, I)`` HU.
        reference: ``(K, J, I)`` HU.
        mask: ``(K, J, I)`` boolean.

    Returns:
        Mean SSIM over the mask voxels away from the border, or ``nan`` when an axis is shorter
        than the window or no mask voxel remains.
    """
    if min(mask.shape) < SSIM_WINDOW:
        return math.nan
    inner = tuple(slice(_CROP, n - _CROP) for n in mask.shape)
    if not mask[inner].any():
        return math.nan
    low = HU_CLIP[0]
    x = np.where(mask, _clipped(image), low) - low
    y = np.where(mask, _clipped(reference), low) - low
    _, ssim_map = structural_similarity(y, x, data_range=DATA_RANGE, full=True)
    return float(np.mean(ssim_map[inner][mask[inner]], dtype=np.float64))


def image_metrics(
    image: npt.NDArray[Any], reference: npt.NDArray[Any], mask: npt.NDArray[np.bool_]
) -> dict[str, Any]:
    """MAE (HU), PSNR (dB) and SSIM of ``image`` against ``reference`` in ``mask``.

    Returns:
        JSON-compatible dict; non-finite values are written as ``None``.
    """

    def finite(v: float, digits: int) -> float | None:
        return round(v, digits) if math.isfinite(v) else None

    return {
        "mae_hu": finite(mae_hu(image, reference, mask), 2),
        "psnr_db": finite(psnr_db(image, reference, mask), 3),
        "ssim": finite(ssim_in_mask(image, reference, mask), 4),
        "mask_voxels": int(mask.sum()),
    }


def metric_definitions() -> dict[str, Any]:
    """How the metrics were computed (recorded next to them)."""
    return {
        "hu_clip": list(HU_CLIP),
        "data_range_hu": DATA_RANGE,
        "mae": "mean |sCT - CT| over the mask voxels, HU, after clipping",
        "psnr": "10 log10(4024^2 / MSE) over the mask voxels, dB, after clipping",
        "ssim": "skimage structural_similarity 3D (7-voxel uniform window, data_range 4024) "
        "on both images clipped, set to -1024 outside the mask and shifted by +1024; the map "
        "averaged over the mask voxels at least 3 voxels from the border (SynthRAD2023)",
    }


def evaluation_mask(
    reference_hu: npt.NDArray[Any],
    fov: npt.NDArray[np.bool_],
    valid: npt.NDArray[np.bool_],
    threshold_hu: float,
    axis: int,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_], dict[str, Any]]:
    """The reference's body, and the part of it inside the CBCT field of view.

    Args:
        reference_hu: Reference CT on the CBCT grid, HU, ``(K, J, I)``.
        fov: CBCT field of view, boolean, same shape.
        valid: Voxels the reference covers (its extent on the CBCT grid), same shape.
        threshold_hu: Body threshold, HU.
        axis: Axial array axis (holes are filled slice by slice across it).

    Returns:
        ``(body, mask, facts)``: the reference body (within ``valid``), the evaluation mask
        ``body & fov`` and the body fraction outside the field of view.
    """
    body = body_mask(reference_hu, threshold_hu, axis, within=valid)
    mask = body & fov
    n_body = int(body.sum())
    facts = {
        "definition": f"reference CT > {threshold_hu:g} HU, largest connected component, holes "
        "filled per axial slice, inside the CBCT field of view (estimated from the CBCT) and "
        "the reference's extent",
        "body_voxels": n_body,
        "voxels": int(mask.sum()),
        "body_fraction_outside_fov": round(float((body & ~fov).sum() / max(n_body, 1)), 4),
    }
    return body, mask, facts
