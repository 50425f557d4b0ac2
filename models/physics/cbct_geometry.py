"""Geometry of the CBCT simulation in numpy: the RTK frame, the detector, the field of view.

Frames:
    The CT volume lives in **LPS** mm (``Volume.affine``: index ``(k, j, i)`` -> LPS). RTK's
    circular geometry turns about its own ``y`` axis with the source at ``(0, 0, sad)`` at
    gantry angle 0 and the detector ``u`` axis along ``x``, ``v`` along ``y``. The simulation
    works in an "RTK frame" ``q = RTK_FROM_LPS @ (p - isocentre)``: RTK ``x`` = LPS ``x``
    (patient left), RTK ``y`` = LPS ``z`` (superior, the rotation axis), RTK ``z`` = LPS ``-y``
    (anterior, towards the source at the first projection). It is a proper rotation
    (determinant +1), so the mapping is rigid and the reconstruction lands back on the CT grid.

Detector:
    :class:`Detector` holds the resolved flat detector: column ``c`` has its centre at
    ``u0_mm + c * pitch_mm`` and row ``r`` at ``v0_mm + r * pitch_mm`` (mm, detector plane, at
    ``sdd`` from the source). Projection arrays are ``[projection, row (v), column (u)]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.errors import InputRejected
from models.physics.cbct_params import CBCTGeometry
from models.volume import Volume

RTK_FROM_LPS = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
"""Rotation taking LPS directions to the RTK frame (rows: RTK x, y, z in LPS)."""

MAX_REACH = 0.9
"""The CT grid must lie within ``MAX_REACH * sad`` of the rotation axis (inside the orbit)."""

MIN_OVERLAP_PIXELS = 4
"""An offset (half-fan) detector must reach this many pixels past the central ray."""


@dataclass(frozen=True)
class Detector:
    """A resolved flat detector (see the module docstring for the coordinates).

    Attributes:
        n_u: Columns.
        n_v: Rows.
        pitch_mm: Pixel size (mm, detector plane).
        u0_mm: ``u`` of the centre of column 0 (mm).
        v0_mm: ``v`` of the centre of row 0 (mm).
        displaced: True for an offset (half-fan) detector, reconstructed with displaced-detector
            weights.
    """

    n_u: int
    n_v: int
    pitch_mm: float
    u0_mm: float
    v0_mm: float
    displaced: bool

    @property
    def u_mm(self) -> npt.NDArray[np.float64]:
        """Column centres ``u`` (mm), shape ``(n_u,)``."""
        return self.u0_mm + self.pitch_mm * np.arange(self.n_u, dtype=np.float64)

    @property
    def v_range_mm(self) -> tuple[float, float]:
        """``v`` of the first and last row centres (mm)."""
        return self.v0_mm, self.v0_mm + self.pitch_mm * (self.n_v - 1)

    def columns(self, keep: npt.NDArray[np.bool_]) -> Detector:
        """The detector cut to the contiguous columns ``keep`` (shape ``(n_u,)``)."""
        index = np.flatnonzero(keep)
        if index.size < 2:
            raise InputRejected("the truncated detector keeps fewer than 2 columns")
        return Detector(
            int(index.size),
            self.n_v,
            self.pitch_mm,
            float(self.u_mm[index[0]]),
            self.v0_mm,
            self.displaced,
        )


def isocentre_lps(volume: Volume) -> npt.NDArray[np.float64]:
    """LPS position (mm) of the centre of the volume's grid, shape ``(3,)``."""
    centre = (np.array(volume.shape, dtype=np.float64) - 1.0) / 2.0
    return volume.index_to_lps(centre)


def check_orthogonal(volume: Volume) -> None:
    """Refuse a sheared grid (gantry tilt): the RTK image needs orthogonal axes."""
    direction = volume.direction
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputRejected(
            "the CT grid is sheared (gantry tilt); resample it to an orthogonal grid first"
        )


def rtk_grid(
    volume: Volume, iso: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The CT grid in the RTK frame, in ITK terms (index order ``(i, j, k)``).

    Args:
        volume: The CT; affine ``(k, j, i)`` -> LPS mm.
        iso: Isocentre, LPS mm, shape ``(3,)``.

    Returns:
        ``(origin, spacing, direction)``: RTK-frame position (mm) of voxel ``(0, 0, 0)``,
        spacing (mm) along ``i, j, k``, and the 3x3 direction (columns: RTK-frame directions of
        the ``i, j, k`` axes).
    """
    steps_ijk = volume.affine[:3, :3][:, ::-1]  # columns: LPS steps along i, j, k
    matrix = RTK_FROM_LPS @ steps_ijk
    spacing = np.linalg.norm(matrix, axis=0)
    origin = RTK_FROM_LPS @ (volume.origin - iso)
    return origin, spacing, matrix / spacing


def _corners_rtk(volume: Volume, iso: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """RTK-frame positions (mm) of the 8 outer corners of the grid, shape ``(8, 3)``."""
    lo, hi = -0.5, np.array(volume.shape, dtype=np.float64) - 0.5
    corners = np.array([[a, b, c] for a in (lo, hi[0]) for b in (lo, hi[1]) for c in (lo, hi[2])])
    return (volume.index_to_lps(corners) - iso) @ RTK_FROM_LPS.T


def resolve_detector(
    volume: Volume, iso: npt.NDArray[np.float64], geometry: CBCTGeometry
) -> Detector:
    """The concrete detector of ``geometry`` for this CT (auto size/pitch filled in).

    Raises:
        InputRejected: The grid reaches outside the orbit, or an offset detector misses the
            central ray.
    """
    sad, sdd = geometry.sad_mm, geometry.sdd_mm
    corners = _corners_rtk(volume, iso)
    reach = float(np.max(np.hypot(corners[:, 0], corners[:, 2])))
    if reach >= MAX_REACH * sad:
        raise InputRejected(
            f"the CT grid reaches {reach:.0f} mm from the rotation axis, too close to the "
            f"source orbit (sad_mm={sad:g}); crop the CT or increase sad_mm"
        )
    pitch = geometry.detector_pitch_mm
    if pitch is None:
        pitch = min(volume.spacing) * sdd / sad
    offset = geometry.detector_offset_mm
    if geometry.detector_shape is not None:
        n_u, n_v = geometry.detector_shape
    else:
        u_half = sdd * math.tan(math.asin(reach / sad))
        height = float(np.max(np.abs(corners[:, 1])))
        v_half = sdd * height / (sad - reach)
        n_u = 2 * math.ceil(max(u_half - abs(offset), pitch) / pitch) + 3
        n_v = 2 * math.ceil(v_half / pitch) + 3
    half_width = (n_u - 1) / 2 * pitch
    if half_width - abs(offset) < MIN_OVERLAP_PIXELS * pitch:
        raise InputRejected(
            f"detector_offset_mm={offset:g} leaves the central ray off the detector "
            f"(half width {half_width:.1f} mm): an offset detector must still cover it"
        )
    return Detector(
        n_u=int(n_u),
        n_v=int(n_v),
        pitch_mm=float(pitch),
        u0_mm=float(offset - half_width),
        v0_mm=float(-(n_v - 1) / 2 * pitch),
        displaced=bool(offset != 0.0),
    )


def truncation_columns(
    detector: Detector, geometry: CBCTGeometry, fov_mm: float
) -> npt.NDArray[np.bool_]:
    """Columns kept when the transaxial FOV at the isocentre is cut to ``fov_mm`` diameter."""
    radius = min(fov_mm / 2.0, MAX_REACH * geometry.sad_mm)
    u_half = geometry.sdd_mm * math.tan(math.asin(radius / geometry.sad_mm))
    keep: npt.NDArray[np.bool_] = np.abs(detector.u_mm) <= u_half + 1e-9
    return keep


def fov_radius_mm(detector: Detector, geometry: CBCTGeometry) -> float:
    """Radius (mm) of the transaxial cylinder reconstructable from the detector.

    A centred detector sees the cylinder of the tangent ray through its nearer edge pixel
    centre; an offset (half-fan) one, seen from both sides over 360 degrees, its farther edge.
    Zero when the detector does not cover the central ray.
    """
    u = detector.u_mm
    lo, hi = float(u[0]), float(u[-1])
    if lo > 0 or hi < 0:
        return 0.0
    edge = max(-lo, hi) if detector.displaced else min(-lo, hi)
    return geometry.sad_mm * math.sin(math.atan(edge / geometry.sdd_mm))


def fov_mask(
    volume: Volume, iso: npt.NDArray[np.float64], detector: Detector, geometry: CBCTGeometry
) -> npt.NDArray[np.bool_]:
    """Voxels seen by the detector in every projection (the reconstructable field of view).

    The transaxial limit is the cylinder of :func:`fov_radius_mm`; axially, a voxel at radius
    ``r`` and height ``h`` must project inside the rows when it is nearest the source, where its
    magnification ``sdd / (sad - r)`` is largest (the "hat" of RTK's FieldOfViewImageFilter).

    Returns:
        Boolean array shaped like ``volume.array`` (``[k, j, i]``).
    """
    steps = RTK_FROM_LPS @ volume.affine[:3, :3]  # RTK-frame step (mm) per k, j, i
    base = RTK_FROM_LPS @ (volume.origin - iso)
    n_k, n_j, n_i = volume.shape
    j = np.arange(n_j, dtype=np.float64)[:, None, None]
    i = np.arange(n_i, dtype=np.float64)[None, :, None]
    in_slice = j * steps[:, 1] + i * steps[:, 2]  # (n_j, n_i, 3), the same for every slice
    limit = fov_radius_mm(detector, geometry)
    v_lo, v_hi = detector.v_range_mm
    inside = np.empty(volume.shape, dtype=np.bool_)
    for k in range(n_k):  # slice by slice: memory of one slice, not of the volume x 3
        q = in_slice + (base + k * steps[:, 0])
        radius = np.hypot(q[..., 0], q[..., 2])
        depth = (geometry.sad_mm - radius) / geometry.sdd_mm
        height = q[..., 1]
        inside[k] = (radius <= limit) & (height <= v_hi * depth) & (height >= v_lo * depth)
    return inside


def axial_axis(volume: Volume) -> int:
    """The array axis (0 = k, 1 = j, 2 = i) closest to the rotation axis (LPS z)."""
    return int(np.argmax(np.abs(volume.direction[2])))


def pad_for_projection(
    hu: npt.NDArray[np.float32], volume: Volume, detector: Detector, geometry: CBCTGeometry
) -> tuple[npt.NDArray[np.float32], Volume, int]:
    """Extend the patient beyond the grid by repeating its border voxels, for projection.

    RTK's Joseph projector integrates between the first and last voxel centres, so a grid that
    ends abruptly would lose half a border voxel. Every axis is padded by one voxel; the axial
    one (:func:`axial_axis`) by as many slices as the cone sees beyond the grid on the far side
    of the orbit (at most the grid's own length), so the scan sees a long object, as a real
    patient is, instead of a slab of CT in air.

    Args:
        hu: CT values ``[k, j, i]`` (HU) on ``volume``'s grid.
        volume: The CT.
        detector: The detector (its rows set how far the cone reaches).
        geometry: The scan.

    Returns:
        ``(padded_hu, padded_volume, axial_slices)``: the padded array, a Volume whose grid
        holds it (same spacing and direction, origin moved), and the slices added at each end
        of the axial axis.
    """
    iso = isocentre_lps(volume)
    corners = _corners_rtk(volume, iso)
    reach = float(np.max(np.hypot(corners[:, 0], corners[:, 2])))
    height = float(np.max(np.abs(corners[:, 1])))
    v_lo, v_hi = detector.v_range_mm
    seen = (max(-v_lo, v_hi) + detector.pitch_mm / 2) * (geometry.sad_mm + reach) / geometry.sdd_mm
    axis = axial_axis(volume)
    step = volume.spacing[axis]
    slices = int(np.clip(math.ceil((seen - height) / step), 1, volume.shape[axis]))
    pads = [(1, 1)] * 3
    pads[axis] = (slices, slices)
    padded = np.pad(hu, pads, mode="edge")
    affine = volume.affine.copy()
    affine[:3, 3] = volume.index_to_lps([-p[0] for p in pads])
    return padded, Volume(padded, affine, volume.modality, volume.units), slices


def rotation_matrix(rotation_deg: tuple[float, float, float]) -> npt.NDArray[np.float64]:
    """3x3 rotation (LPS) about x, then y, then z by the given angles in degrees."""
    ax, ay, az = (math.radians(a) for a in rotation_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def misregister(
    hu: npt.NDArray[np.float32],
    volume: Volume,
    iso: npt.NDArray[np.float64],
    shift_mm: tuple[float, float, float],
    rotation_deg: tuple[float, float, float],
    air_hu: float = -1000.0,
) -> npt.NDArray[np.float32]:
    """Move the patient rigidly on the CT grid (trilinear, air enters at the borders).

    The patient point at LPS ``p`` moves to ``R (p - iso) + iso + shift``, with ``R`` from
    :func:`rotation_matrix`; the result is the moved patient sampled on the same grid.

    Args:
        hu: CT values ``[k, j, i]`` in HU.
        volume: The CT whose grid ``hu`` is on.
        iso: Rotation centre, LPS mm, shape ``(3,)``.
        shift_mm: Translation, LPS mm.
        rotation_deg: Rotation about the LPS x, y, z axes, degrees.
        air_hu: Value entering from outside the grid.

    Returns:
        Float32 array like ``hu``.
    """
    steps = volume.affine[:3, :3]
    origin = volume.origin
    inv_steps = np.linalg.inv(steps)
    rot_t = rotation_matrix(rotation_deg).T
    matrix = inv_steps @ rot_t @ steps
    offset = inv_steps @ (rot_t @ (origin - iso - np.asarray(shift_mm)) + iso - origin)
    out = ndimage.affine_transform(
        hu.astype(np.float32, copy=False),
        matrix,
        offset=offset,
        order=1,
        mode="constant",
        cval=air_hu,
    )
    return np.asarray(out, dtype=np.float32)
