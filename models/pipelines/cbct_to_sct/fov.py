"""The CBCT field of view, estimated from the reconstructed volume alone, and truncation.

A real CBCT carries no field-of-view mask: the scanner writes one constant padding value
(-1000 HU in :mod:`models.physics.cbct`, often -1024 or the type's minimum on scanners) into
every voxel outside the reconstructable cylinder. The estimate works per axial slice (across
the rotation axis, :func:`~.masks.axial_axis`):

1. **Padding value**: ``fov_padding_hu`` when given, else the value every in-plane corner of
   at least half of the slices holds exactly; none -> no padding, the whole grid is the FOV.
2. **Radial profile** about the grid centre (the isocentre of a CBCT reconstruction), in mm:
   rings one in-plane voxel wide; a ring belongs to the FOV when at least half of its voxels
   differ from the padding value, so air inside the FOV that happens to equal it (noise,
   clipping at -1000) does not open holes. The slice's FOV is the disc inside the outermost
   such ring, plus the voxels of that ring and the next that differ from the padding (the
   cylinder's edge cuts through them).
3. **Cylinder check**: if more than :data:`NOT_A_CYLINDER_FRACTION` of the non-padding voxels
   lie beyond that disc, the constant region is not a reconstruction cylinder (it is clipped
   air around the patient, as in many planning CTs): no FOV is inferred (whole grid).

Truncation: the body (above the body threshold, inside the FOV) touching the FOV's in-plane
boundary (its outermost voxel ring, the grid border when the FOV is the whole grid) means
anatomy was outside the scanned cylinder; how much of that boundary the body covers is
reported and flags the volume at :data:`TRUNCATION_RIM_FRACTION`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.pipelines.cbct_to_sct.masks import body_mask, in_plane_spacing, per_slice
from models.volume import Volume

RING_FILL = 0.5
"""A ring belongs to the FOV when at least this fraction of its voxels is not padding."""

NOT_A_CYLINDER_FRACTION = 0.01
"""Non-padding voxels allowed beyond the estimated disc before the FOV estimate is dropped."""

TRUNCATION_RIM_FRACTION = 0.02
"""Share of the FOV boundary voxels covered by body from which the CBCT is flagged truncated."""


@dataclass(frozen=True)
class FieldOfView:
    """The estimated CBCT field of view.

    Attributes:
        mask: True inside the field of view, shape ``(K, J, I)`` (``[k, j, i]``).
        padding_hu: The padding value found (HU), or ``None`` when the whole grid is the FOV.
        radius_mm: Per axial slice (in order along the axial axis), the largest distance (mm)
            from the grid centre of a FOV voxel centre (0 for a slice outside the FOV); empty
            when no padding was found.
        facts: JSON-compatible description (method, fractions, radii).
    """

    mask: npt.NDArray[np.bool_]
    padding_hu: float | None
    radius_mm: tuple[float, ...]
    facts: dict[str, Any]


def detect_padding(hu: npt.NDArray[Any], axis: int) -> float | None:
    """The value the four in-plane corners of at least half of the axial slices hold, or None."""
    view = np.moveaxis(np.asarray(hu), axis, 0)
    corners = view[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    full = corners[np.all(corners == corners[:, :1], axis=1), 0]
    if full.size * 2 < view.shape[0]:
        return None
    values, counts = np.unique(full, return_counts=True)
    best = int(counts.argmax())
    return float(values[best]) if counts[best] * 2 >= view.shape[0] else None


def _radius_map(shape: tuple[int, int], spacing: tuple[float, float]) -> npt.NDArray[np.float64]:
    """Distance (mm) of each in-plane voxel centre from the grid centre, shape ``shape``."""
    a = (np.arange(shape[0]) - (shape[0] - 1) / 2.0) * spacing[0]
    b = (np.arange(shape[1]) - (shape[1] - 1) / 2.0) * spacing[1]
    return np.asarray(np.hypot(a[:, None], b[None, :]))


def _discs(
    data: npt.NDArray[np.bool_], radius: npt.NDArray[np.float64], ring_mm: float
) -> tuple[npt.NDArray[np.bool_], list[float]]:
    """Per slice of ``data`` (True = not padding, ``(S, R, C)``): the FOV disc and its radius."""
    rings = np.floor(radius / ring_mm).astype(np.int64).ravel()
    n_rings = int(rings.max()) + 1
    per_ring = np.bincount(rings, minlength=n_rings).astype(np.float64)
    out = np.zeros(data.shape, dtype=bool)
    radii: list[float] = []
    for s in range(data.shape[0]):
        filled = np.bincount(rings, weights=data[s].ravel(), minlength=n_rings) / per_ring
        inside = np.flatnonzero(filled >= RING_FILL)
        if not inside.size:
            radii.append(0.0)
            continue
        edge = float(inside[-1] * ring_mm)  # inner radius of the outermost filled ring
        out[s] = (radius < edge) | (data[s] & (radius < edge + 2.0 * ring_mm))
        outer = radius[out[s]]
        radii.append(float(outer.max()) if outer.size else 0.0)
    return out, radii


def boundary(mask: npt.NDArray[np.bool_], axis: int) -> npt.NDArray[np.bool_]:
    """The outermost in-plane voxel ring of ``mask`` in each axial slice (grid edge included)."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    structure = np.moveaxis(structure, 0, axis)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return np.asarray(mask & ~eroded)


def truncation(
    hu: npt.NDArray[Any], fov: npt.NDArray[np.bool_], axis: int, threshold_hu: float
) -> dict[str, Any]:
    """How much of the FOV boundary the body covers (the CBCT's own body, inside the FOV).

    Returns:
        ``truncated`` (flag), ``boundary_body_fraction`` (body voxels on the boundary / boundary
        voxels), ``slices_truncated`` / ``slices`` (axial slices whose boundary has body on more
        than :data:`TRUNCATION_RIM_FRACTION` of it) and a message.
    """
    body = body_mask(hu, threshold_hu, axis, within=fov)
    rim = boundary(fov, axis)
    on_rim = per_slice(body & rim, axis).reshape(body.shape[axis], -1).sum(axis=1)
    rim_n = per_slice(rim, axis).reshape(body.shape[axis], -1).sum(axis=1)
    fraction = float(on_rim.sum() / max(int(rim_n.sum()), 1))
    slices = int(np.sum(on_rim > TRUNCATION_RIM_FRACTION * np.maximum(rim_n, 1)))
    truncated = fraction >= TRUNCATION_RIM_FRACTION
    message = (
        f"the body touches the CBCT field-of-view boundary on {100 * fraction:.1f} % of it "
        f"({slices} of {body.shape[axis]} axial slices): anatomy outside the field of view is "
        "missing from the CBCT and HU near the edge are unreliable"
        if truncated
        else "the body lies inside the CBCT field of view (no truncation detected)"
    )
    return {
        "truncated": bool(truncated),
        "boundary_body_fraction": round(fraction, 4),
        "slices_truncated": slices,
        "slices": int(body.shape[axis]),
        "threshold_fraction": TRUNCATION_RIM_FRACTION,
        "message": message,
    }


def estimate_fov(
    cbct: Volume, axis: int, threshold_hu: float, padding_hu: float | None = None
) -> FieldOfView:
    """Estimate the CBCT field of view from the volume alone (see the module docstring).

    Args:
        cbct: The CBCT in HU, ``array[k, j, i]``, affine ``(k, j, i, 1)`` -> LPS mm.
        axis: Its axial array axis (across the rotation axis).
        threshold_hu: Body threshold (HU) of the truncation check.
        padding_hu: Padding value outside the FOV; ``None``: :func:`detect_padding`.

    Returns:
        The :class:`FieldOfView`, whose facts include the truncation check.
    """
    hu = np.asarray(cbct.array)
    found = padding_hu if padding_hu is not None else detect_padding(hu, axis)
    full = np.ones(hu.shape, dtype=bool)
    facts: dict[str, Any] = {
        "estimated_from": "the CBCT volume (constant padding outside a cylinder about the "
        "grid centre)",
        "padding_hu": found,
        "padding_source": "parameter" if padding_hu is not None else "detected",
    }
    mask = full
    radii: list[float] = []
    if found is None:
        facts["method"] = "no constant padding in the slice corners: whole grid"
    else:
        spacing = in_plane_spacing(cbct, axis)
        data = np.moveaxis(hu, axis, 0) != found
        radius = _radius_map((data.shape[1], data.shape[2]), spacing)
        discs, radii = _discs(data, radius, min(spacing))
        beyond = float((data & ~discs).sum() / max(int(data.sum()), 1))
        facts["non_padding_beyond_disc_fraction"] = round(beyond, 5)
        if beyond > NOT_A_CYLINDER_FRACTION:
            facts["method"] = (
                f"the {found:g} HU region is not a cylinder about the grid centre "
                f"({100 * beyond:.1f} % of the other voxels lie beyond the fitted disc): "
                "no field of view inferred, whole grid"
            )
            facts["padding_hu"], found, radii = None, None, []
        else:
            facts["method"] = "radial profile about the grid centre, per axial slice"
            mask = np.moveaxis(discs, 0, axis)
            facts["radius_mm"] = {"min": min(radii), "max": max(radii)}
    facts["fraction"] = round(float(mask.mean()), 5)
    facts.update(truncation(hu, mask, axis, threshold_hu))
    return FieldOfView(np.ascontiguousarray(mask), found, tuple(radii), facts)
