"""Body masks and axial-slice helpers of ``cbct-to-sct`` (numpy/scipy only).

Arrays are ``[k, j, i]`` as in :mod:`models.volume`; "axial" means the array axis closest to
the patient's superior axis (LPS z), which is the CBCT rotation axis. Nothing here resamples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.volume import Volume

HU_LIMITS: tuple[float, float] = (-1024.0, 3071.0)
"""Range every sCT is clipped to (12-bit CT storage: -1024 .. 3071 HU)."""


def axial_axis(volume: Volume) -> int:
    """The array axis (0 = k, 1 = j, 2 = i) closest to the patient's superior axis (LPS z)."""
    return int(np.argmax(np.abs(volume.direction[2])))


def in_plane_spacing(volume: Volume, axis: int) -> tuple[float, float]:
    """Spacing (mm) of the two array axes other than ``axis``, in array order."""
    spacing = [s for a, s in enumerate(volume.spacing) if a != axis]
    return (spacing[0], spacing[1])


def per_slice(mask: npt.NDArray[np.bool_], axis: int) -> npt.NDArray[np.bool_]:
    """View of ``mask`` with the axial ``axis`` first: ``(n_axial, rows, cols)``."""
    return np.moveaxis(mask, axis, 0)


def largest_component(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The largest 6-connected 3D component of ``mask`` (all False when it is empty)."""
    components, n = ndimage.label(mask)
    if n <= 1:
        return np.asarray(components > 0)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return np.asarray(components == int(sizes.argmax()))


def fill_holes_per_slice(mask: npt.NDArray[np.bool_], axis: int) -> npt.NDArray[np.bool_]:
    """Fill the holes of ``mask`` in each slice across ``axis`` (2D; a copy)."""
    out = np.array(mask, dtype=bool)
    view = per_slice(out, axis)
    for s in range(view.shape[0]):
        if view[s].any():
            view[s] = ndimage.binary_fill_holes(view[s])
    return out


def body_mask(
    hu: npt.NDArray[Any],
    threshold_hu: float,
    axis: int,
    within: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.bool_]:
    """The body of a CT/CBCT: voxels above ``threshold_hu``, largest component, holes filled.

    Args:
        hu: Image in HU, shape ``(K, J, I)``.
        threshold_hu: Voxels strictly above it are candidate body voxels.
        axis: Axial array axis: holes (airways, sinuses) are filled slice by slice across it,
            so air open to the outside at the slice's edge stays out.
        within: Optional boolean mask (same shape), e.g. the CBCT field of view: voxels outside
            it are never body.

    Returns:
        Boolean mask, shape ``(K, J, I)``.
    """
    mask = np.asarray(hu) > threshold_hu
    if within is not None:
        mask &= within
    mask = fill_holes_per_slice(largest_component(mask), axis)
    if within is not None:
        mask &= within
    return mask
