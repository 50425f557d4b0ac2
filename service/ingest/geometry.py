"""Geometry summary of a stored series, computed from headers only (no pixel data).

The summary is a JSON-ready dict in the conventions of :mod:`models.volume`, equal to what
:func:`service.io.read_any.read_volume` later gives for the same files::

    {"volume": True,
     "shape": [k, j, i],                      # slices, rows, columns
     "spacing_mm": [dk, dj, di],              # step between slices, rows, columns (mm)
     "origin_lps_mm": [x, y, z],              # centre of voxel (0, 0, 0), LPS
     "direction_lps": [[...], [...], [...]],  # 3x3, columns = LPS unit vectors of k, j, i
     "affine_lps": [[...] x 4],               # (k, j, i, 1) -> LPS mm
     "plane": "axial" | "coronal" | "sagittal" | "oblique",
     "frame_of_reference_uid": "..."}

A DICOM series that cannot be read as one volume (missing geometry, inconsistent slices, gaps,
several acquisitions) gets ``{"volume": False, "reason": "...", "n_files": N}``; it is stored all
the same, and a job on it fails with that reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from models.errors import InputRejected
from service.io.dicom_geometry import (
    _affine,
    _Slice,
    order_slices,
)

PLANE_COSINE = 0.9
"""Smallest |cosine| between the slice normal and a patient axis to name the plane after it."""


def _round(values: npt.NDArray[np.float64]) -> Any:
    return np.round(values, 6).tolist()


def _plane(direction: npt.NDArray[np.float64]) -> str:
    """Anatomical plane of the slices from the in-plane directions (columns 1 and 2: j, i)."""
    normal = np.cross(direction[:, 2], direction[:, 1])
    axis = int(np.argmax(np.abs(normal)))
    if abs(float(normal[axis])) < PLANE_COSINE:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def geometry_summary(
    shape_kji: Sequence[int], affine: npt.NDArray[np.float64], frame_of_reference_uid: str
) -> dict[str, Any]:
    """Summary of a grid.

    Args:
        shape_kji: ``(n_slices, n_rows, n_columns)``.
        affine: 4x4, index ``(k, j, i, 1)`` -> LPS mm.
        frame_of_reference_uid: DICOM FrameOfReferenceUID, ``""`` when unknown.

    Returns:
        The dict described in the module docstring.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / spacing
    return {
        "volume": True,
        "shape": [int(n) for n in shape_kji],
        "spacing_mm": _round(spacing),
        "origin_lps_mm": _round(affine[:3, 3]),
        "direction_lps": _round(direction),
        "affine_lps": _round(affine),
        "plane": _plane(direction),
        "frame_of_reference_uid": frame_of_reference_uid,
    }


def dicom_series_geometry(
    slices_per_file: Sequence[list[_Slice] | None],
    errors: Sequence[str],
    first_thickness: Dataset | None,
) -> dict[str, Any]:
    """Geometry summary of a DICOM series from the slices of its files.

    Args:
        slices_per_file: Slices of each file (``None`` where the file has no 3D geometry).
        errors: For each file, why it has no geometry (``""`` if it has).
        first_thickness: Header holding SpacingBetweenSlices/SliceThickness, for the slice step
            of a one-slice series.

    Returns:
        The summary, or ``{"volume": False, "reason": ..., "n_files": N}``.
    """
    n_files = len(slices_per_file)
    for slices, error in zip(slices_per_file, errors, strict=True):
        if slices is None:
            return {"volume": False, "reason": error, "n_files": n_files}
    slices = [s for file_slices in slices_per_file if file_slices for s in file_slices]
    try:
        ordered, normal = order_slices(slices)
        affine = _affine(ordered, first_thickness or Dataset(), normal)
    except InputRejected as exc:
        return {"volume": False, "reason": str(exc), "n_files": n_files}
    shape = (len(ordered), ordered[0].rows, ordered[0].columns)
    return geometry_summary(shape, affine, ordered[0].frame_of_reference_uid)
