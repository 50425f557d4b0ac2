"""DICOM series -> :class:`~models.volume.Volume`.

Sources: a folder (searched recursively; non-DICOM files are skipped), a single DICOM file, or a
``.zip`` archive (members are read in memory after a safety check). Classic single-frame series and
enhanced multi-frame CT/MR (one file, per-frame functional groups) give the same result.

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

import copy
import io
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from models.errors import InputRejected
from models.volume import Volume

MAX_ZIP_UNCOMPRESSED_BYTES = 4 * 1024**3
"""Cap on the total declared uncompressed size of a ``.zip`` source (4 GiB)."""

MAX_ZIP_MEMBERS = 200_000
"""Cap on the number of members of a ``.zip`` source."""

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

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class SeriesInfo:
    """Summary of one series found in a source.

    Attributes:
        series_instance_uid: SeriesInstanceUID (``""`` when absent).
        study_instance_uid: StudyInstanceUID (``""`` when absent or empty).
        modality: Modality code, e.g. ``"CT"``.
        series_description: SeriesDescription (``""`` when absent).
        series_number: SeriesNumber, ``None`` when absent.
        n_instances: Number of DICOM instances (files) in the series.
        files: The instances: :class:`~pathlib.Path` for files, member names (``str``) for a zip.
            A tuple so that the dataclass stays hashable.
    """

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    series_description: str
    series_number: int | None
    n_instances: int
    files: tuple[Path | str, ...]


@dataclass
class DicomSeries:
    """A loaded DICOM series.

    Attributes:
        volume: The voxels (HU as float32 for CT) and their LPS geometry.
        template: Header of the first instance in slice order, PixelData removed; used to copy
            the patient/study modules into derived objects. Contains identifying data: never
            log it.
        sop_instance_uids: SOPInstanceUID of each slice, in slice (``k``) order. For an enhanced
            multi-frame source the same UID repeats for every frame of that file.
        transfer_syntax_uids: Transfer syntaxes of the source files.
    """

    volume: Volume
    template: Dataset
    sop_instance_uids: list[str]
    transfer_syntax_uids: set[str]


# --------------------------------------------------------------------------------------------
# Sources: folder, single file, zip archive.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One candidate file: a path on disk or a member of the open zip archive."""

    ref: Path | str
    label: str


class _Source:
    """Uniform access to the candidate files of a folder, a single file or a zip archive."""

    def __init__(self, source: Path, archive: zipfile.ZipFile | None, entries: list[_Entry]):
        self.source = source
        self.archive = archive
        self.entries = entries
        self.single_file = archive is None and source.is_file()

    def read(self, entry: _Entry, stop_before_pixels: bool) -> Dataset | None:
        """Read one entry; ``None`` if it is not a DICOM Part 10 file.

        Raises:
            InputRejected: The file looks like DICOM but its header cannot be parsed.
        """
        try:
            if self.archive is not None:
                data = _read_zip_member(self.archive, str(entry.ref), entry.label)
                fileobj: Any = io.BytesIO(data)
            else:
                fileobj = entry.ref
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = pydicom.dcmread(fileobj, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            return None
        except InputRejected:
            raise
        except Exception as exc:  # pydicom raises many types on corrupt headers
            raise InputRejected(
                f"{entry.label}: corrupt or truncated DICOM file ({type(exc).__name__}: {exc})"
            ) from exc
        for warning in caught:
            if "End of file reached" in str(warning.message):
                raise InputRejected(f"{entry.label}: truncated DICOM file (unexpected end of file)")
        return ds


def _read_zip_member(archive: zipfile.ZipFile, member: str, label: str) -> bytes:
    """Read a zip member (size limited by its declared size, CRC checked by :mod:`zipfile`)."""
    try:
        return archive.read(member)
    except (zipfile.BadZipFile, RuntimeError, OSError, ValueError) as exc:
        raise InputRejected(f"{label}: cannot read zip member ({exc})") from exc


def _check_zip_member_name(name: str, archive_path: Path) -> None:
    """Reject absolute member paths and members containing ``..``."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    absolute = name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":")
    if absolute or ".." in parts:
        raise InputRejected(
            f"{archive_path}: unsafe zip member name {name!r} (absolute path or '..')"
        )


def _has_dicm_preamble(path: Path) -> bool:
    """True when bytes 128..131 of the file are ``DICM`` (a DICOM Part 10 file)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


@contextmanager
def _open_source(source: Path) -> Iterator[_Source]:
    """Open ``source`` (folder, file or zip) and yield its candidate entries."""
    if not source.exists():
        raise InputRejected(f"{source}: no such file or folder")
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file())
        yield _Source(source, None, [_Entry(p, str(p)) for p in files])
        return
    if not _has_dicm_preamble(source) and zipfile.is_zipfile(source):
        try:
            archive = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputRejected(f"{source}: corrupt zip archive ({exc})") from exc
        with archive:
            yield _Source(source, archive, _zip_entries(archive, source))
        return
    yield _Source(source, None, [_Entry(source, str(source))])


def _zip_entries(archive: zipfile.ZipFile, archive_path: Path) -> list[_Entry]:
    """List the file members of a zip after the safety checks (names, count, total size)."""
    infos = archive.infolist()
    if len(infos) > MAX_ZIP_MEMBERS:
        raise InputRejected(f"{archive_path}: too many zip members ({len(infos)})")
    total = 0
    entries: list[_Entry] = []
    for info in infos:
        _check_zip_member_name(info.filename, archive_path)
        if info.is_dir():
            continue
        total += info.file_size
        entries.append(_Entry(info.filename, f"{archive_path}:{info.filename}"))
    if total > MAX_ZIP_UNCOMPRESSED_BYTES:
        raise InputRejected(
            f"{archive_path}: declared uncompressed size {total} bytes exceeds the limit of "
            f"{MAX_ZIP_UNCOMPRESSED_BYTES} bytes"
        )
    return sorted(entries, key=lambda e: str(e.ref))


def _is_image(ds: Dataset) -> bool:
    """True for image instances (has Rows/Columns), False for DICOMDIR, SR, RTSTRUCT..."""
    media_class = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")
    if media_class == _DICOMDIR_SOP_CLASS:
        return False
    return "Rows" in ds and "Columns" in ds


def _scan(src: _Source) -> list[tuple[_Entry, Dataset]]:
    """Read every entry header; keep DICOM image instances."""
    found: list[tuple[_Entry, Dataset]] = []
    for entry in src.entries:
        ds = src.read(entry, stop_before_pixels=True)
        if ds is None:
            if src.single_file:
                raise InputRejected(f"{entry.label}: not a DICOM file (no DICM preamble)")
            continue
        if not _is_image(ds):
            if src.single_file:
                raise InputRejected(f"{entry.label}: DICOM file without an image (no Rows/Columns)")
            continue
        found.append((entry, ds))
    if not found:
        raise InputRejected(f"{src.source}: no DICOM image files found")
    return found


def _str(ds: Dataset, keyword: str) -> str:
    """A string attribute, ``""`` when absent or empty."""
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _group_series(found: list[tuple[_Entry, Dataset]]) -> dict[str, list[tuple[_Entry, Dataset]]]:
    """Group scanned instances by SeriesInstanceUID, keeping scan order."""
    groups: dict[str, list[tuple[_Entry, Dataset]]] = {}
    for entry, ds in found:
        groups.setdefault(_str(ds, "SeriesInstanceUID"), []).append((entry, ds))
    return groups


def _series_info(uid: str, members: list[tuple[_Entry, Dataset]]) -> SeriesInfo:
    """Build the :class:`SeriesInfo` of one group."""
    first = members[0][1]
    number = first.get("SeriesNumber")
    return SeriesInfo(
        series_instance_uid=uid,
        study_instance_uid=_str(first, "StudyInstanceUID"),
        modality=_str(first, "Modality"),
        series_description=_str(first, "SeriesDescription"),
        series_number=int(number) if number not in (None, "") else None,
        n_instances=len(members),
        files=tuple(entry.ref for entry, _ in members),
    )


def _sorted_infos(groups: dict[str, list[tuple[_Entry, Dataset]]]) -> list[SeriesInfo]:
    """SeriesInfo of every group, ordered by series number then UID."""
    infos = [_series_info(uid, members) for uid, members in groups.items()]
    return sorted(
        infos,
        key=lambda s: (s.series_number is None, s.series_number or 0, s.series_instance_uid),
    )


def list_series(source: Path) -> list[SeriesInfo]:
    """List the image series in a folder, a DICOM file or a zip archive.

    Args:
        source: Folder (searched recursively; non-DICOM files skipped), single DICOM file, or
            ``.zip`` archive (absolute or ``..`` member names are refused, total declared
            uncompressed size capped at :data:`MAX_ZIP_UNCOMPRESSED_BYTES`).

    Returns:
        One :class:`SeriesInfo` per SeriesInstanceUID, ordered by SeriesNumber.

    Raises:
        InputRejected: Missing source, unsafe zip, a single file that is not DICOM, a corrupt
            DICOM header, or no DICOM image at all.
    """
    with _open_source(Path(source)) as src:
        return _sorted_infos(_group_series(_scan(src)))


def _describe(infos: Sequence[SeriesInfo]) -> str:
    """One line per series for error messages: uid, modality, description, count."""
    return "; ".join(
        f"{s.series_instance_uid or '<no uid>'} ({s.modality or '?'}, "
        f"{s.series_description or 'no description'!r}, {s.n_instances} files)"
        for s in infos
    )


def _select_series(
    source: Path, groups: dict[str, list[tuple[_Entry, Dataset]]], series_uid: str | None
) -> list[tuple[_Entry, Dataset]]:
    """Pick the requested series, or the only one."""
    infos = _sorted_infos(groups)
    if series_uid is not None:
        if series_uid not in groups:
            raise InputRejected(
                f"{source}: series {series_uid} not found; available: {_describe(infos)}"
            )
        return groups[series_uid]
    if len(groups) > 1:
        raise InputRejected(
            f"{source}: {len(groups)} series found, choose one by SeriesInstanceUID: "
            f"{_describe(infos)}"
        )
    return next(iter(groups.values()))


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


def _rescale(item: Dataset | None, ds: Dataset, label: str) -> tuple[float, float, str]:
    """Rescale slope, intercept and type from a functional-group item or the top level."""
    for holder in (item, ds):
        if holder is not None and "RescaleSlope" in holder:
            try:
                slope = float(holder.RescaleSlope)
                intercept = float(holder.get("RescaleIntercept", 0.0))
            except (TypeError, ValueError) as exc:
                raise InputRejected(f"{label}: non-numeric RescaleSlope/Intercept") from exc
            if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0.0:
                raise InputRejected(f"{label}: invalid rescale slope/intercept")
            return slope, intercept, _str(holder, "RescaleType")
    if "ModalityLUTSequence" in ds:
        raise InputRejected(f"{label}: Modality LUT Sequence is not supported (only rescale)")
    return 1.0, 0.0, ""


def _require(holder: Dataset | None, keyword: str, label: str) -> Any:
    """Value of a required geometry attribute, or :class:`InputRejected`."""
    if holder is None or keyword not in holder or holder.get(keyword) in (None, ""):
        raise InputRejected(
            f"{label}: missing {keyword}; the image has no 3D geometry (only positioned CT/MR-like "
            "images can be loaded as volumes)"
        )
    return holder.get(keyword)


def _classic_slice(ds: Dataset, index: int, label: str) -> _Slice:
    """Geometry of a classic single-frame instance."""
    slope, intercept, rescale_type = _rescale(None, ds, label)
    return _Slice(
        label=label,
        dataset_index=index,
        frame=0,
        sop_uid=_str(ds, "SOPInstanceUID"),
        position=_floats(_require(ds, "ImagePositionPatient", label), 3, label, "IPP"),
        orientation=_floats(_require(ds, "ImageOrientationPatient", label), 6, label, "IOP"),
        pixel_spacing=_floats(_require(ds, "PixelSpacing", label), 2, label, "PixelSpacing"),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        slope=slope,
        intercept=intercept,
        rescale_type=rescale_type,
        frame_of_reference_uid=_str(ds, "FrameOfReferenceUID"),
    )


def _enhanced_slices(ds: Dataset, index: int, label: str) -> list[_Slice]:
    """Geometry of every frame of an enhanced multi-frame instance."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != n_frames:
        raise InputRejected(
            f"{label}: PerFrameFunctionalGroupsSequence has "
            f"{0 if per_frame is None else len(per_frame)} items for {n_frames} frames"
        )
    slices = []
    for frame in range(n_frames):
        frame_label = f"{label} frame {frame + 1}"
        position = _functional_item(ds, frame, "PlanePositionSequence")
        orientation = _functional_item(ds, frame, "PlaneOrientationSequence")
        measures = _functional_item(ds, frame, "PixelMeasuresSequence")
        transform = _functional_item(ds, frame, "PixelValueTransformationSequence")
        slope, intercept, rescale_type = _rescale(transform, ds, frame_label)
        ipp = _require(position, "ImagePositionPatient", frame_label)
        iop = _require(orientation, "ImageOrientationPatient", frame_label)
        spacing = _require(measures, "PixelSpacing", frame_label)
        slices.append(
            _Slice(
                label=frame_label,
                dataset_index=index,
                frame=frame,
                sop_uid=_str(ds, "SOPInstanceUID"),
                position=_floats(ipp, 3, frame_label, "IPP"),
                orientation=_floats(iop, 6, frame_label, "IOP"),
                pixel_spacing=_floats(spacing, 2, frame_label, "PixelSpacing"),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                slope=slope,
                intercept=intercept,
                rescale_type=rescale_type,
                frame_of_reference_uid=_str(ds, "FrameOfReferenceUID"),
            )
        )
    return slices


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


# --------------------------------------------------------------------------------------------
# Pixels.
# --------------------------------------------------------------------------------------------


def decode_frames(ds: Dataset, label: str) -> npt.NDArray[Any]:
    """Decode the stored pixel values of an instance (no rescale applied).

    Compressed transfer syntaxes (JPEG 2000, JPEG-LS, JPEG lossless, RLE, deflate...) are decoded
    by pydicom's pixel handlers with the pylibjpeg plugins.

    Args:
        ds: A fully read dataset (with PixelData).
        label: File name used in error messages.

    Returns:
        Stored values, shape ``(n_frames, rows, columns)``, native byte order.

    Raises:
        InputRejected: Missing, truncated or undecodable pixel data.
    """
    if "PixelData" not in ds:
        raise InputRejected(f"{label}: pixel data missing or truncated")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise many exception types on corrupt data
        raise InputRejected(
            f"{label}: corrupt or truncated pixel data ({type(exc).__name__}: {exc})"
        ) from exc
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = (n_frames, int(ds.Rows), int(ds.Columns))
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.shape != expected:
        raise InputRejected(f"{label}: decoded pixel shape {array.shape}, expected {expected}")
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _output_dtype(slices: list[_Slice], raw_dtype: np.dtype[Any], modality: str) -> np.dtype[Any]:
    """float32 for CT or any real rescale; the stored integer type when values are unchanged."""
    identity = all(s.slope == 1.0 and s.intercept == 0.0 for s in slices)
    if modality != "CT" and identity:
        return raw_dtype
    return np.dtype(np.float32)


def _stack_pixels(
    ordered: list[_Slice], datasets: list[Dataset], labels: list[str], modality: str
) -> npt.NDArray[Any]:
    """Decode each instance once and stack the rescaled slices in ``k`` order."""
    decoded: dict[int, npt.NDArray[Any]] = {}
    for s in ordered:
        if s.dataset_index not in decoded:
            idx = s.dataset_index
            decoded[idx] = decode_frames(datasets[idx], labels[idx])
    raw_dtype = np.result_type(*[a.dtype for a in decoded.values()])
    dtype = _output_dtype(ordered, raw_dtype, modality)
    out = np.empty((len(ordered), ordered[0].rows, ordered[0].columns), dtype=dtype)
    for k, s in enumerate(ordered):
        raw = decoded[s.dataset_index][s.frame]
        if dtype == raw_dtype:
            out[k] = raw
        else:
            out[k] = raw.astype(np.float64) * s.slope + s.intercept
    return out


# --------------------------------------------------------------------------------------------
# Public loader.
# --------------------------------------------------------------------------------------------


def _read_full(
    src: _Source, members: list[tuple[_Entry, Dataset]]
) -> tuple[list[Dataset], list[str]]:
    """Read the selected instances with their pixel data."""
    datasets: list[Dataset] = []
    labels: list[str] = []
    for entry, _ in members:
        ds = src.read(entry, stop_before_pixels=False)
        if ds is None:  # pragma: no cover - the header was readable a moment ago
            raise InputRejected(f"{entry.label}: not a DICOM file")
        datasets.append(ds)
        labels.append(entry.label)
    return datasets, labels


def _study_uid(first: Dataset, label: str, allow_missing: bool) -> str:
    """StudyInstanceUID, or a refusal explaining how to opt in when it is empty."""
    uid = _str(first, "StudyInstanceUID")
    if not uid and not allow_missing:
        raise InputRejected(
            f"{label}: StudyInstanceUID is empty; derived objects could not be filed in the "
            "source study. Pass allow_missing_study_uid=True (CLI: --allow-missing-study-uid) to "
            "load it anyway; derived series then get a new StudyInstanceUID"
        )
    return uid


def _units(modality: str, slices: list[_Slice]) -> str:
    """``"HU"`` for CT unless a RescaleType other than HU is declared."""
    if modality != "CT":
        return ""
    types = {s.rescale_type.upper() for s in slices} - {""}
    return "HU" if types <= {"HU"} else ""


def _transfer_syntax(ds: Dataset) -> str:
    """TransferSyntaxUID from the file meta information, ``""`` when absent."""
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def _template(ds: Dataset) -> Dataset:
    """Deep copy of the header without pixel data."""
    template = copy.deepcopy(ds)
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in template:
            delattr(template, keyword)
    return template


def load_dicom_series(
    source: Path, series_uid: str | None = None, allow_missing_study_uid: bool = False
) -> DicomSeries:
    """Load one DICOM series as a Volume.

    Args:
        source: Folder (recursive), single DICOM file, or ``.zip`` archive.
        series_uid: SeriesInstanceUID to load; required when the source holds several series.
        allow_missing_study_uid: Accept an empty StudyInstanceUID; the Volume meta then records
            ``study_uid_missing=True``.

    Returns:
        The :class:`DicomSeries`. ``volume.array`` has shape ``(n_slices, rows, columns)``;
        CT is float32 in HU (``units="HU"``), other modalities keep their stored integer type
        when no rescale applies, else float32. ``volume.affine`` maps ``(k, j, i, 1)`` to LPS mm.

    Raises:
        InputRejected: See the module docstring; among others several series without
            ``series_uid`` (the message lists them), corrupt or truncated pixel data, duplicate
            or missing slices, uneven spacing, inconsistent orientation/size/spacing, mixed
            frames of reference, or an empty StudyInstanceUID without opt-in.
    """
    source = Path(source)
    with _open_source(source) as src:
        members = _select_series(source, _group_series(_scan(src)), series_uid)
        study_uid = _study_uid(members[0][1], members[0][0].label, allow_missing_study_uid)
        datasets, labels = _read_full(src, members)
    slices = [s for n, ds in enumerate(datasets) for s in _instance_slices(ds, n, labels[n])]
    _check_consistent(slices)
    row_dir, col_dir = _directions(slices[0])
    normal = np.cross(row_dir, col_dir)
    ordered = _sort_slices(slices, normal)
    if len(ordered) > 1:
        _check_steps(ordered, normal)
    first = datasets[ordered[0].dataset_index]
    modality = _str(first, "Modality") or "OT"
    array = _stack_pixels(ordered, datasets, labels, modality)
    sop_uids = [s.sop_uid for s in ordered]
    syntaxes = {_transfer_syntax(ds) for ds in datasets} - {""}
    meta: dict[str, Any] = {
        "series_instance_uid": _str(first, "SeriesInstanceUID"),
        "study_instance_uid": study_uid,
        "sop_instance_uids": sop_uids,
        "series_description": _str(first, "SeriesDescription"),
        "source_transfer_syntaxes": sorted(syntaxes),
    }
    if not study_uid:
        meta["study_uid_missing"] = True
    volume = Volume(
        array=array,
        affine=_affine(ordered, first, normal),
        modality=modality,
        units=_units(modality, ordered),
        frame_of_reference_uid=ordered[0].frame_of_reference_uid,
        meta=meta,
    )
    return DicomSeries(
        volume=volume,
        template=_template(first),
        sop_instance_uids=sop_uids,
        transfer_syntax_uids=syntaxes,
    )
