"""The optional planning CT of ``cbct-to-sct``: checked, then brought onto the CBCT grid.

It is used for evaluation only (never by a method). Refused: not a CT in HU, another frame of
reference (the CBCT and the planning CT are in different patient coordinates until someone
registers them; comparing them as they are would report the misregistration as HU error), or
no physical overlap with the CBCT. A reference on another grid of the same frame is resampled
onto the CBCT grid with trilinear interpolation (HU), through the LPS positions of the voxel
centres; CBCT voxels outside the reference's grid are marked invalid and left out of every
metric. An unknown frame of reference (NIfTI carries none) cannot be checked: that is said in
the facts, and positions are taken as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.errors import InputRejected
from models.volume import Volume

SAME_GRID_MM = 1e-3
"""Affines whose entries differ by less than this (mm) describe the same grid."""


@dataclass(frozen=True)
class AlignedReference:
    """The planning CT on the CBCT grid.

    Attributes:
        hu: Reference HU on the CBCT grid, float32, ``(K, J, I)`` (``-1024`` where invalid).
        valid: True where the CBCT voxel centre lies inside the reference's voxels.
        facts: JSON-compatible: frame-of-reference check, resampling, coverage.
    """

    hu: npt.NDArray[np.float32]
    valid: npt.NDArray[np.bool_]
    facts: dict[str, Any]


def _frame_check(reference: Volume, cbct: Volume) -> str:
    """``"same"`` or a note when unknown; raises when both are known and differ."""
    ref_uid, cbct_uid = reference.frame_of_reference_uid, cbct.frame_of_reference_uid
    if ref_uid and cbct_uid:
        if ref_uid != cbct_uid:
            raise InputRejected(
                "the planning CT (reference) is in another frame of reference than the CBCT "
                f"(FrameOfReferenceUID {ref_uid} vs {cbct_uid}): register it to the CBCT "
                "first (rigidly or deformably) and pass the registered CT, which then shares "
                "the CBCT's frame; cbct-to-sct does not compare images in different frames"
            )
        return "same"
    missing = " and ".join(
        name for name, uid in (("CBCT", cbct_uid), ("reference", ref_uid)) if not uid
    )
    return (
        f"not verifiable: no frame of reference UID on the {missing} (e.g. NIfTI); the "
        "images are compared at their stated positions, so they must already be registered"
    )


def _corners_lps(volume: Volume) -> npt.NDArray[np.float64]:
    """LPS positions (mm) of the 8 outer corners of the grid, ``(8, 3)``."""
    hi = np.array(volume.shape, dtype=np.float64) - 0.5
    corners = [[a, b, c] for a in (-0.5, hi[0]) for b in (-0.5, hi[1]) for c in (-0.5, hi[2])]
    return volume.index_to_lps(corners)


def _overlaps(a: Volume, b: Volume) -> bool:
    """Whether the axis-aligned LPS boxes of the two grids intersect."""
    ca, cb = _corners_lps(a), _corners_lps(b)
    return bool(np.all(ca.min(0) < cb.max(0)) and np.all(cb.min(0) < ca.max(0)))


def _resample(
    reference: Volume, cbct: Volume
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Trilinear reference HU at the CBCT voxel centres, and which fall inside its voxels.

    A centre inside the outer half voxel of the reference takes its edge value (no
    extrapolation).
    """
    to_ref = np.linalg.inv(reference.affine) @ cbct.affine  # CBCT (k, j, i) -> reference index
    n_k, n_j, n_i = cbct.shape
    jj, ii = np.meshgrid(np.arange(n_j), np.arange(n_i), indexing="ij")
    plane = np.stack([np.zeros_like(jj), jj, ii], axis=0).reshape(3, -1).astype(np.float64)
    upper = np.array(reference.shape, dtype=np.float64)[:, None] - 0.5
    source = np.asarray(reference.array, dtype=np.float32)
    hu = np.full(cbct.shape, -1024.0, dtype=np.float32)
    valid = np.zeros(cbct.shape, dtype=bool)
    for k in range(n_k):  # one CBCT slice at a time: memory of a slice of coordinates
        plane[0] = k
        idx = to_ref[:3, :3] @ plane + to_ref[:3, 3:]
        inside = np.all((idx >= -0.5) & (idx <= upper), axis=0)
        if not inside.any():
            continue
        values = ndimage.map_coordinates(source, idx[:, inside], order=1, mode="nearest")
        hu[k].reshape(-1)[inside] = values
        valid[k].reshape(-1)[inside] = True
    return hu, valid


def align_reference(reference: Volume, cbct: Volume) -> AlignedReference:
    """Check ``reference`` against ``cbct`` and bring it onto the CBCT grid.

    Args:
        reference: Planning CT, HU, any grid, affine ``(k, j, i, 1)`` -> LPS mm.
        cbct: The CBCT, HU.

    Returns:
        The :class:`AlignedReference`.

    Raises:
        InputRejected: Not a Volume, not CT in HU, non-finite voxels, another frame of
            reference, or no overlap with the CBCT.
    """
    if not isinstance(reference, Volume):
        raise InputRejected(f"inputs['reference'] must be a volume, got {type(reference).__name__}")
    if reference.modality not in ("CT", "OT") or reference.units != "HU":
        raise InputRejected(
            "the reference must be a planning CT in HU, got modality "
            f"{reference.modality!r} with units {reference.units!r}"
        )
    if not np.all(np.isfinite(reference.array)):
        raise InputRejected("the reference CT contains NaN or infinite voxels")
    frame = _frame_check(reference, cbct)
    facts: dict[str, Any] = {"given": True, "frame_of_reference": frame}
    same = reference.shape == cbct.shape and np.allclose(
        reference.affine, cbct.affine, rtol=0.0, atol=SAME_GRID_MM
    )
    if same:
        hu = np.asarray(reference.array, dtype=np.float32)
        valid = np.ones(cbct.shape, dtype=bool)
        facts.update({"resampled": False, "grid": "the CBCT's"})
    else:
        if not _overlaps(reference, cbct):
            raise InputRejected(
                "the planning CT (reference) does not overlap the CBCT in space: their grids "
                "are disjoint in patient coordinates (wrong patient, or not registered)"
            )
        hu, valid = _resample(reference, cbct)
        if not valid.any():
            raise InputRejected(
                "the planning CT (reference) covers no CBCT voxel centre: nothing to compare"
            )
        facts.update(
            {
                "resampled": True,
                "interpolation": "trilinear (HU), onto the CBCT grid",
                "source_shape": list(reference.shape),
                "source_spacing_mm": [round(s, 4) for s in reference.spacing],
            }
        )
    facts["coverage_fraction"] = round(float(valid.mean()), 5)
    return AlignedReference(hu, valid, facts)
