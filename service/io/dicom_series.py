"""DICOM series -> :class:`~models.volume.Volume`.

Sources: a folder (searched recursively; non-DICOM files are skipped), a single DICOM file, or a
``.zip`` archive (members are read in memory after a safety check). Classic single-frame series and
enhanced multi-frame CT/MR (one file, per-frame functional groups) give the same result.

Geometry follows :mod:`models.volume` (``array[k, j, i]``, affine to LPS mm); how slices are
sorted and the affine built is described once, in :mod:`service.io.dicom_geometry`.

Every unusable input raises :class:`~models.errors.InputRejected` with a message that names the
file and the problem, never a patient identifier.

Units: CT is read as HU (``units="HU"``) only when it is calibrated: every slice has
RescaleSlope/RescaleIntercept (Type 1 in the CT Image module) and no RescaleType other than HU.
A CT without them (seen in some CBCT exports) is loaded all the same, its stored values as
float32, but with ``units=""``, ``meta["hu_calibrated"] = False`` and the reason in
``meta["units_note"]``: pipelines that need HU refuse it, and the runner adds that reason to
their message, instead of treating raw stored values as HU.

The work is shared with :mod:`service.io.dicom_files` (sources, zip safety, file discovery),
:mod:`service.io.dicom_geometry` (slice geometry, checks, affine) and
:mod:`service.io.dicom_pixels` (pixel decoding and rescale).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from models.errors import InputRejected
from models.volume import Volume
from service.io.dicom_files import _Entry, _open_source, _scan, _Source, _str
from service.io.dicom_geometry import (
    _affine,
    _instance_slices,
    _Slice,
    order_slices,
)
from service.io.dicom_pixels import _stack_pixels


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


UNCALIBRATED_CT_NOTE = (
    "the CT series has no Rescale Slope/Intercept: its values are stored pixel values, "
    "not calibrated HU"
)
"""``meta["units_note"]`` of a CT Volume read from slices without RescaleSlope."""


def _units(modality: str, slices: list[_Slice]) -> tuple[str, dict[str, Any]]:
    """Units of the values and, for an uncalibrated CT, what the meta records about it.

    CT is ``"HU"`` only when every slice has RescaleSlope/RescaleIntercept (the CT Image module
    requires them) and no RescaleType other than HU is declared. Otherwise the units are ``""``,
    and the meta gets ``hu_calibrated=False`` and ``units_note`` saying why, so that a pipeline
    that needs HU refuses with that reason instead of computing on raw stored values.
    """
    if modality != "CT":
        return "", {}
    if not all(s.has_rescale for s in slices):
        return "", {"hu_calibrated": False, "units_note": UNCALIBRATED_CT_NOTE}
    types = {s.rescale_type.upper() for s in slices} - {""}
    if types <= {"HU"}:
        return "HU", {}
    note = f"the CT series declares RescaleType {'/'.join(sorted(types))}, not HU"
    return "", {"hu_calibrated": False, "units_note": note}


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
        when no rescale applies, else float32.
        ``volume.affine`` maps ``(k, j, i, 1)`` to LPS mm. A CT without RescaleSlope/Intercept
        (or with a RescaleType other than HU) is float32 with ``units=""``,
        ``meta["hu_calibrated"]=False`` and the reason in ``meta["units_note"]``.

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
    ordered, normal = order_slices(slices)
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
    units, calibration = _units(modality, ordered)
    meta.update(calibration)
    volume = Volume(
        array=array,
        affine=_affine(ordered, first, normal),
        modality=modality,
        units=units,
        frame_of_reference_uid=ordered[0].frame_of_reference_uid,
        meta=meta,
    )
    return DicomSeries(
        volume=volume,
        template=_template(first),
        sop_instance_uids=sop_uids,
        transfer_syntax_uids=syntaxes,
    )
