"""Overlap and surface-distance metrics of label maps (numpy/scipy; no torch).

Both masks live on one voxel grid with ``spacing`` in mm along its array axes. Surfaces are the
mask voxels with a 6-connected neighbour outside the mask (a voxel at the array border counts as
surface); distances are Euclidean in mm from a scipy distance transform of the other surface.
HD95 follows MONAI's ``compute_hausdorff_distance(percentile=95)``: the 95th percentile of each
directed set of surface distances, then the larger of the two. The surface Dice (normalised
surface distance, NSD, of Nikolov et al. 2018) follows MONAI's ``compute_surface_dice`` (voxel
counts, not surface areas): the share of both surfaces that lies within a tolerance of the other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import ndimage


def dice(prediction: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float:
    """Dice ``2|A∩B| / (|A| + |B|)``; 1.0 when both are empty."""
    denom = int(prediction.sum()) + int(truth.sum())
    return 1.0 if denom == 0 else float(2 * np.logical_and(prediction, truth).sum() / denom)


def _surface(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1, 1:-1] = eroded[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def surface_distances(
    a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_], spacing: Sequence[float]
) -> npt.NDArray[np.float64]:
    """Distances (mm) from every surface voxel of ``a`` to the nearest surface voxel of ``b``.

    Args:
        a: ``(D0, D1, D2)`` bool, non-empty.
        b: Same shape, non-empty.
        spacing: Voxel size along the array axes, mm.
    """
    sa, sb = _surface(a), _surface(b)
    bbox = np.argwhere(sa | sb)
    lo, hi = bbox.min(0), bbox.max(0) + 1
    crop = tuple(slice(int(x), int(y)) for x, y in zip(lo, hi, strict=True))
    dist = ndimage.distance_transform_edt(~sb[crop], sampling=tuple(float(s) for s in spacing))
    return np.asarray(dist[sa[crop]], dtype=np.float64)


def hd95(
    prediction: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_], spacing: Sequence[float]
) -> float:
    """95th-percentile symmetric Hausdorff distance, mm.

    Returns:
        0.0 when both masks are empty; ``inf`` when exactly one is empty.
    """
    if not prediction.any() and not truth.any():
        return 0.0
    if not prediction.any() or not truth.any():
        return float("inf")
    return float(
        max(
            np.percentile(surface_distances(prediction, truth, spacing), 95),
            np.percentile(surface_distances(truth, prediction, spacing), 95),
        )
    )


def surface_dice(
    prediction: npt.NDArray[np.bool_],
    truth: npt.NDArray[np.bool_],
    spacing: Sequence[float],
    tolerance_mm: float,
) -> float:
    """Surface Dice at a tolerance: ``(|{d_pt <= tau}| + |{d_tp <= tau}|) / (|S_p| + |S_t|)``.

    ``d_pt`` are the distances (mm) from the prediction's surface voxels to the truth's surface
    and ``d_tp`` the reverse. Unlike Dice, it does not punish a boundary that is off by less than
    the tolerance, so on a coarse grid (3-5 mm voxels) it separates "boundary one voxel off" from
    "organ in the wrong place".

    Args:
        prediction: ``(D0, D1, D2)`` bool mask.
        truth: Same shape.
        spacing: Voxel size along the array axes, mm.
        tolerance_mm: Accepted boundary deviation ``tau``, mm (>= 0).

    Returns:
        A value in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    if not prediction.any() and not truth.any():
        return 1.0
    if not prediction.any() or not truth.any():
        return 0.0
    d_pt = surface_distances(prediction, truth, spacing)
    d_tp = surface_distances(truth, prediction, spacing)
    within = int((d_pt <= tolerance_mm).sum()) + int((d_tp <= tolerance_mm).sum())
    return float(within / (d_pt.size + d_tp.size))
