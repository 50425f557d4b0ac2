"""Volume: voxels that carry their geometry.

Conventions (the one place they are defined; every reader/writer converts to them):

* ``Volume.array`` is indexed ``array[k, j, i]`` = ``[slice, row, column]``, i.e. shape
  ``(n_slices, n_rows, n_columns)``. For a DICOM series, ``k`` follows the slice normal
  (row direction x column direction), ``j`` is the DICOM row index and ``i`` the column index.
* ``Volume.affine`` is a 4x4 matrix mapping the *array index* ``(k, j, i, 1)`` to patient
  coordinates in millimetres in the **LPS** frame used by DICOM (x to the patient's Left,
  y to Posterior, z to Superior). Column ``0`` of the affine is the step (in mm, LPS) between
  consecutive slices, column ``1`` between rows, column ``2`` between columns, column ``3`` the
  centre of voxel ``(0, 0, 0)``.
* NIfTI and ITK tools use RAS (nibabel) or LPS with ``(i, j, k)`` index order (ITK); the explicit
  conversions are :func:`lps_to_ras`, :func:`ras_to_lps`, :func:`to_ijk_order` and
  :func:`from_ijk_order`. Nothing else in the code base flips axes.

CT volumes are stored in Hounsfield units (``units="HU"``) as float32 unless the reader kept an
integer type exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from models.errors import InputRejected

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Flip of x and y: maps LPS patient coordinates to RAS and back (it is its own inverse)."""

# Permutation swapping index order (k, j, i) <-> (i, j, k) in homogeneous coordinates.
_SWAP_KI = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


@dataclass(frozen=True)
class Volume:
    """A 3D image with its geometry.

    Attributes:
        array: Voxel values, shape ``(n_slices, n_rows, n_columns)`` indexed ``[k, j, i]``.
        affine: 4x4 float64 matrix, index ``(k, j, i, 1)`` -> LPS position in mm.
        modality: DICOM modality code, e.g. ``"CT"`` or ``"MR"`` (``"OT"`` if unknown).
        units: Intensity units, e.g. ``"HU"`` for CT, ``""`` for arbitrary MR units.
        frame_of_reference_uid: DICOM Frame of Reference UID, ``""`` when unknown.
        meta: Non-identifying descriptive metadata (UIDs of the source series, description).
            Never patient name, ID or birth date.
    """

    array: npt.NDArray[Any]
    affine: npt.NDArray[np.float64]
    modality: str = "OT"
    units: str = ""
    frame_of_reference_uid: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate shape and affine."""
        if self.array.ndim != 3:
            raise InputRejected(f"a Volume needs a 3D array, got shape {self.array.shape}")
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise InputRejected(f"affine must be 4x4, got {affine.shape}")
        if not np.all(np.isfinite(affine)):
            raise InputRejected("affine contains NaN or infinity")
        if not np.allclose(affine[3], [0.0, 0.0, 0.0, 1.0]):
            raise InputRejected(f"affine last row must be [0, 0, 0, 1], got {affine[3]}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-6:
            raise InputRejected("affine is singular (zero or degenerate voxel spacing)")
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(n_slices, n_rows, n_columns)``."""
        k, j, i = self.array.shape
        return (k, j, i)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in mm along ``(k, j, i)`` = (slice, row, column)."""
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))

    @property
    def origin(self) -> npt.NDArray[np.float64]:
        """LPS position (mm) of the centre of voxel ``(0, 0, 0)``."""
        return self.affine[:3, 3].copy()

    @property
    def direction(self) -> npt.NDArray[np.float64]:
        """3x3 unit direction cosines, columns = LPS directions of the k, j, i axes."""
        return self.affine[:3, :3] / np.array(self.spacing)

    def with_array(self, array: npt.NDArray[Any], **changes: Any) -> Volume:
        """Return a copy on the same grid with a new array of the same shape.

        Args:
            array: New voxel values, shape equal to ``self.shape``.
            **changes: Other fields to replace (``units``, ``meta``...).

        Returns:
            The new Volume; geometry and frame of reference are kept.
        """
        if array.shape != self.array.shape:
            raise InputRejected(
                f"new array shape {array.shape} differs from the grid {self.array.shape}"
            )
        return replace(self, array=array, **changes)

    def index_to_lps(self, index: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map array indices ``(..., 3)`` in ``(k, j, i)`` order to LPS mm, shape ``(..., 3)``."""
        idx = np.asarray(index, dtype=np.float64)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]


def lps_to_ras(affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Convert an affine whose output is LPS mm to one whose output is RAS mm.

    Args:
        affine: 4x4 matrix mapping some index to LPS.

    Returns:
        4x4 matrix mapping the same index to RAS.
    """
    return LPS_TO_RAS @ affine


def ras_to_lps(affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Convert an affine whose output is RAS mm to one whose output is LPS mm."""
    return LPS_TO_RAS @ affine


def to_ijk_order(
    array: npt.NDArray[Any], affine: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """Reorder a ``(k, j, i)`` array and affine to ``(i, j, k)`` index order (NIfTI/ITK order).

    Args:
        array: Shape ``(n_slices, n_rows, n_columns)``.
        affine: 4x4, index ``(k, j, i)`` -> world.

    Returns:
        ``(array_ijk, affine_ijk)`` with array shape ``(n_columns, n_rows, n_slices)`` and the
        affine mapping ``(i, j, k)`` to the same world frame.
    """
    return np.ascontiguousarray(array.transpose(2, 1, 0)), affine @ _SWAP_KI


def from_ijk_order(
    array: npt.NDArray[Any], affine: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """Inverse of :func:`to_ijk_order`: ``(i, j, k)`` array/affine to ``(k, j, i)`` order."""
    return np.ascontiguousarray(array.transpose(2, 1, 0)), affine @ _SWAP_KI
