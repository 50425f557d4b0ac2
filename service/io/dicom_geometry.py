"""Geometry of DICOM slices: position, orientation, spacing and rescale, checks and affine.

Classic single-frame instances give one slice each; enhanced multi-frame CT/MR instances give
one slice per frame, read from the per-frame (else shared) functional groups.

Geometry follows :mod:`models.volume`: ``array[k, j, i]`` = ``[slice, row, column]`` and the affine
maps ``(k, j, i, 1)`` to LPS millimetres. Slices are sorted by the projection of
ImagePositionPatient (IPP) on the slice normal ``n = row_dir x col_dir`` taken from
ImageOrientationPatient (IOP). Affine column 0 is the *actual* step between consecutive IPPs, so a
gantry-tilted (sheared) series keeps its true geometry; column 1 is ``col_dir * PixelSpacing[0]``
(between rows) and column 2 is ``row_dir * PixelSpacing[1]`` (between columns).

Every unusable input raises :class:`~models.errors.InputRejected` with a message that names the
file and the problem, never a patient identifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from models.errors import InputRejected
from service.io.dicom_files import _str

ORIENTATION_TOLERANCE = 1e-4
"""Largest accepted difference between IOP direction cosines of two slices."""

SPACING_RELATIVE_TOLERANCE = 1e-4
"""Largest accepted relative difference of PixelSpacing between slices."""

GAP_FACTOR = 1.5
"""A slice step larger than this times the median step means missing slices."""

UNEVEN_RELATIVE_TOLERANCE = 0.01
"""Largest accepted relative deviation of a slice step from the median step."""

DUPLICATE_DISTANCE_MM = 1e-3
"""Two slices whose positions along the normal differ by less than this (mm) are duplicates."""


# --------------------------------------------------------------------------------------------
# Per-slice geometry (classic and enhanced multi-frame).
# --------------------------------------------------------------------------------------------


@dataclass
class _Slice:
    """Geometry and rescale of one 2D slice (a classic instance or one enhanced frame)."""

    label: str
    dataset_index: int
    frame: int
    sop_uid: str
    position: npt.NDArray[np.float64]
    orientation: npt.NDArray[np.float64]
    pixel_spacing: npt.NDArray[np.float64]
    rows: int
    columns: int
    slope: float
    intercept: float
    rescale_type: str
    frame_of_reference_uid: str
    has_rescale: bool = True
    """Whether RescaleSlope was present (else slope 1, intercept 0 were assumed)."""


def _floats(value: Any, n: int, label: str, name: str) -> npt.NDArray[np.float64]:
    """Parse a multi-valued numeric attribute of length ``n``."""
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputRejected(f"{label}: {name} is not numeric ({value!r})") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise InputRejected(f"{label}: {name} must have {n} finite values, got {value!r}")
    return arr


def _functional_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """Item of a functional group for ``frame``: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        group = per_frame[frame]
        if sequence in group and len(group[sequence].value) > 0:
            item: Dataset = group[sequence].value[0]
            return item
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared is not None and len(shared) > 0:
        group = shared[0]
        if sequence in group and len(group[sequence].value) > 0:
            shared_item: Dataset = group[sequence].value[0]
            return shared_item
    return None


def _rescale(item: Dataset | None, ds: Dataset, label: str) -> tuple[float, float, str, bool]:
    """Rescale slope, intercept, type and whether present, from a functional group or the top."""
    for holder in (item, ds):
        if holder is not None and "RescaleSlope" in holder:
            try:
                slope = float(holder.RescaleSlope)
                intercept = float(holder.get("RescaleIntercept", 0.0))
            except (TypeError, ValueError) as exc:
                raise InputRejected(f"{label}: non-numeric RescaleSlope/Intercept") from exc
            if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0.0:
                raise InputRejected(f"{label}: invalid rescale slope/intercept")
            return slope, intercept, _str(holder, "RescaleType"), True
    if "ModalityLUTSequence" in ds:
        raise InputRejected(f"{label}: Modality LUT Sequence is not supported (only rescale)")
    return 1.0, 0.0, "", False


def _require(holder: Dataset | None, keyword: str, label: str) -> Any:
    """Value of a required geometry attribute, or :class:`InputRejected`."""
    if holder is None or keyword not in holder or holder.get(keyword) in (None, ""):
        raise InputRejected(
            f"{label}: missing {keyword}; the image has no 3D geometry (only positioned CT/MR-like "
            "images can be loaded as volumes)"
        )
    return holder.get(keyword)


def _slice(
    ds: Dataset,
    index: int,
    frame: int,
    label: str,
    holders: tuple[Dataset | None, Dataset | None, Dataset | None, Dataset | None],
) -> _Slice:
    """Geometry of one frame from its (position, orientation, measures, transform) holders."""
    position, orientation, measures, transform = holders
    slope, intercept, rescale_type, has_rescale = _rescale(transform, ds, label)
    ipp = _require(position, "ImagePositionPatient", label)
    iop = _require(orientation, "ImageOrientationPatient", label)
    spacing = _require(measures, "PixelSpacing", label)
    return _Slice(
        label=label,
        dataset_index=index,
        frame=frame,
        sop_uid=_str(ds, "SOPInstanceUID"),
        position=_floats(ipp, 3, label, "IPP"),
        orientation=_floats(iop, 6, label, "IOP"),
        pixel_spacing=_floats(spacing, 2, label, "PixelSpacing"),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        slope=slope,
        intercept=intercept,
        rescale_type=rescale_type,
        frame_of_reference_uid=_str(ds, "FrameOfReferenceUID"),
        has_rescale=has_rescale,
    )


def _classic_slice(ds: Dataset, index: int, label: str) -> _Slice:
    """Geometry of a classic single-frame instance (all attributes at the top level)."""
    return _slice(ds, index, 0, label, (ds, ds, ds, None))


def _enhanced_slices(ds: Dataset, index: int, label: str) -> list[_Slice]:
    """Geometry of every frame of an enhanced multi-frame instance."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != n_frames:
        raise InputRejected(
            f"{label}: PerFrameFunctionalGroupsSequence has "
            f"{0 if per_frame is None else len(per_frame)} items for {n_frames} frames"
        )
    return [
        _slice(ds, index, frame, f"{label} frame {frame + 1}", _frame_holders(ds, frame))
        for frame in range(n_frames)
    ]


def _frame_holders(
    ds: Dataset, frame: int
) -> tuple[Dataset | None, Dataset | None, Dataset | None, Dataset | None]:
    """Functional-group items holding a frame's position, orientation, measures, rescale."""
    return (
        _functional_item(ds, frame, "PlanePositionSequence"),
        _functional_item(ds, frame, "PlaneOrientationSequence"),
        _functional_item(ds, frame, "PixelMeasuresSequence"),
        _functional_item(ds, frame, "PixelValueTransformationSequence"),
    )


def _instance_slices(ds: Dataset, index: int, label: str) -> list[_Slice]:
    """Slices of one instance (classic: one; enhanced: one per frame)."""
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputRejected(f"{label}: colour images (SamplesPerPixel > 1) are not supported")
    if "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_slices(ds, index, label)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InputRejected(
            f"{label}: multi-frame image without per-frame geometry "
            "(PerFrameFunctionalGroupsSequence) cannot be loaded as a volume"
        )
    return [_classic_slice(ds, index, label)]


# --------------------------------------------------------------------------------------------
# Validation and affine.
# --------------------------------------------------------------------------------------------


def _check_consistent(slices: list[_Slice]) -> None:
    """Same orientation, matrix size, pixel spacing and frame of reference in every slice."""
    ref = slices[0]
    for s in slices[1:]:
        if np.max(np.abs(s.orientation - ref.orientation)) > ORIENTATION_TOLERANCE:
            raise InputRejected(
                f"{s.label}: ImageOrientationPatient {s.orientation.tolist()} differs from "
                f"{ref.label} {ref.orientation.tolist()} (inconsistent orientations)"
            )
        if (s.rows, s.columns) != (ref.rows, ref.columns):
            raise InputRejected(
                f"{s.label}: {s.rows}x{s.columns} pixels differs from {ref.label} "
                f"{ref.rows}x{ref.columns}"
            )
        rel = np.abs(s.pixel_spacing - ref.pixel_spacing) / ref.pixel_spacing
        if np.max(rel) > SPACING_RELATIVE_TOLERANCE:
            raise InputRejected(
                f"{s.label}: PixelSpacing {s.pixel_spacing.tolist()} differs from {ref.label} "
                f"{ref.pixel_spacing.tolist()}"
            )
        if s.frame_of_reference_uid != ref.frame_of_reference_uid:
            raise InputRejected(
                f"{s.label}: FrameOfReferenceUID differs from {ref.label} "
                "(mixed frames of reference in one series)"
            )


def _directions(s: _Slice) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Unit row direction (along columns index ``i``) and column direction (along ``j``)."""
    row, col = s.orientation[:3], s.orientation[3:]
    norm_r, norm_c = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if abs(norm_r - 1.0) > 1e-3 or abs(norm_c - 1.0) > 1e-3 or abs(float(row @ col)) > 1e-3:
        raise InputRejected(
            f"{s.label}: ImageOrientationPatient {s.orientation.tolist()} is not two orthogonal "
            "unit vectors"
        )
    return row / norm_r, col / norm_c


def _sort_slices(slices: list[_Slice], normal: npt.NDArray[np.float64]) -> list[_Slice]:
    """Sort by position along the slice normal (stable)."""
    return sorted(slices, key=lambda s: float(s.position @ normal))


def _check_steps(ordered: list[_Slice], normal: npt.NDArray[np.float64]) -> None:
    """Refuse duplicate positions, missing slices, uneven spacing and non-collinear steps."""
    proj = np.array([float(s.position @ normal) for s in ordered])
    steps = np.diff(proj)
    for n, step in enumerate(steps):
        if step < DUPLICATE_DISTANCE_MM:
            raise InputRejected(
                f"{ordered[n + 1].label}: duplicate slice position (same as {ordered[n].label}); "
                "the series may mix several acquisitions, echoes or time points"
            )
    median = float(np.median(steps))
    for n, step in enumerate(steps):
        if step > GAP_FACTOR * median:
            raise InputRejected(
                f"missing slice(s) between {ordered[n].label} and {ordered[n + 1].label}: "
                f"step {step:.4g} mm vs median {median:.4g} mm"
            )
    for n, step in enumerate(steps):
        if abs(step - median) > UNEVEN_RELATIVE_TOLERANCE * median:
            raise InputRejected(
                f"uneven slice spacing between {ordered[n].label} and {ordered[n + 1].label}: "
                f"step {step:.4g} mm vs median {median:.4g} mm (more than "
                f"{UNEVEN_RELATIVE_TOLERANCE:.0%} off)"
            )
    positions = np.stack([s.position for s in ordered])
    vectors = np.diff(positions, axis=0)
    mean = (positions[-1] - positions[0]) / (len(ordered) - 1)
    deviation = np.linalg.norm(vectors - mean, axis=1)
    worst = int(np.argmax(deviation))
    if deviation[worst] > UNEVEN_RELATIVE_TOLERANCE * float(np.linalg.norm(mean)):
        raise InputRejected(
            f"slice positions of {ordered[worst].label} and {ordered[worst + 1].label} are not "
            "on the line through the other slices (inconsistent in-plane shift)"
        )


def order_slices(slices: list[_Slice]) -> tuple[list[_Slice], npt.NDArray[np.float64]]:
    """Check that slices form one volume and sort them along the slice normal.

    Args:
        slices: Slices of one series, in any order.

    Returns:
        The slices in increasing position along the normal, and the unit normal (LPS).

    Raises:
        InputRejected: Inconsistent orientation/size/spacing, duplicate or missing slices,
            uneven spacing.
    """
    _check_consistent(slices)
    row_dir, col_dir = _directions(slices[0])
    normal = np.cross(row_dir, col_dir)
    ordered = _sort_slices(slices, normal)
    if len(ordered) > 1:
        _check_steps(ordered, normal)
    return ordered, normal


def _single_slice_step(ds: Dataset, normal: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Slice step of a one-slice series: normal x (SpacingBetweenSlices|SliceThickness|1 mm)."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(keyword)
        try:
            thickness = abs(float(value)) if value not in (None, "") else 0.0
        except (TypeError, ValueError):
            thickness = 0.0
        if thickness > 0.0 and np.isfinite(thickness):
            return normal * thickness
    return normal * 1.0


def _affine(
    ordered: list[_Slice], first_ds: Dataset, normal: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """4x4 affine, index ``(k, j, i, 1)`` -> LPS mm."""
    row_dir, col_dir = _directions(ordered[0])
    if len(ordered) > 1:
        step = (ordered[-1].position - ordered[0].position) / (len(ordered) - 1)
    else:
        step = _single_slice_step(first_ds, normal)
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = col_dir * ordered[0].pixel_spacing[0]
    affine[:3, 2] = row_dir * ordered[0].pixel_spacing[1]
    affine[:3, 3] = ordered[0].position
    return affine
