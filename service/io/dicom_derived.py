r"""Volume -> derived DICOM series (one single-frame file per slice).

The derived series joins the source study: same StudyInstanceUID and FrameOfReferenceUID, patient
and study modules copied from the source template, a new SeriesInstanceUID and new
SOPInstanceUIDs, ``ImageType = DERIVED\SECONDARY`` (plus ``AXIAL`` for CT, as the CT Image
module requires a third value), a DerivationDescription, and references to the source images
(SourceImageSequence and, when the source SeriesInstanceUID is known, ReferencedSeriesSequence).

Geometry (LPS, mm) per slice ``k``: ImagePositionPatient = ``affine @ (k, 0, 0, 1)``;
ImageOrientationPatient = unit(affine column 2) (row direction, along the column index ``i``)
followed by unit(affine column 1) (column direction, along ``j``); PixelSpacing =
``[|column 1|, |column 2|]`` = [between rows, between columns]. Because IPP is written per slice,
tilted-gantry (sheared) and oblique volumes are expressed exactly. SliceThickness and
SpacingBetweenSlices are both the distance between slice planes (slice step projected on the
normal). An in-plane shear (rows not perpendicular to columns) cannot be expressed and is refused.
A reader sorts slices along the normal ``row x column``: when affine column 0 points against it,
the series read back has ``k`` reversed (the same voxels at the same positions).

Stored values are 16-bit with RescaleSlope/RescaleIntercept:

* all values integral and within int16: signed int16, slope 1, intercept 0 (bit-exact);
* all values integral with a range of at most 65535: uint16, slope 1, intercept = minimum
  (bit-exact);
* otherwise: uint16, intercept = minimum and slope = range / 65000 (both as written in the DS
  strings), so that ``|stored * slope + intercept - value| <= slope / 2`` (plus float64 rounding).

Transfer syntax: Explicit VR Little Endian. SOP class: CT Image Storage for CT, MR Image Storage for
MR, otherwise Secondary Capture Image Storage. When the template's StudyInstanceUID is empty (source
loaded with ``allow_missing_study_uid``) a **new StudyInstanceUID** is generated; when no frame of
reference is known a new FrameOfReferenceUID is generated.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from models.errors import InputRejected
from models.volume import Volume

from .atomic import atomic_dir

QUANTIZATION_LEVELS = 65000
"""Number of uint16 steps used over the value range for non-integral data."""

CT_WINDOW = (40.0, 400.0)
"""Default (center, width) in HU written for CT (soft tissue)."""

_PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "PatientSpeciesDescription",
    "PatientBreedDescription",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "ProcedureCodeSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientPosition",
    "BodyPartExamined",
    "PositionReferenceIndicator",
)
_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "PositionReferenceIndicator",
)
_MR_KEYWORDS = {
    "ScanningSequence": "RM",
    "SequenceVariant": "NONE",
    "ScanOptions": None,
    "MRAcquisitionType": None,
    "RepetitionTime": None,
    "EchoTime": None,
    "EchoTrainLength": None,
}


@dataclass(frozen=True)
class _Quantized:
    """16-bit stored values and the rescale that maps them back."""

    stored: npt.NDArray[Any]
    slope: float
    intercept: float
    signed: bool


@dataclass(frozen=True)
class _Geometry:
    """Per-series DICOM geometry derived from the affine."""

    orientation: list[float]
    pixel_spacing: list[float]
    slice_spacing: float
    normal: npt.NDArray[np.float64]


def _ds(value: float) -> DSfloat:
    """A DS value formatted to at most 16 characters."""
    return DSfloat(float(value), auto_format=True)


def _quantize(values: npt.NDArray[Any]) -> _Quantized:
    """Choose 16-bit storage and rescale (see the module docstring)."""
    data = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(data)):
        raise InputRejected("volume contains NaN or infinity; cannot write DICOM")
    lo, hi = float(data.min()), float(data.max())
    if np.array_equal(data, np.round(data)):
        if lo >= -32768 and hi <= 32767:
            return _Quantized(data.astype(np.int16), 1.0, 0.0, True)
        if hi - lo <= 65535:
            return _Quantized((data - lo).astype(np.uint16), 1.0, lo, False)
        raise InputRejected(f"value range {lo}..{hi} does not fit 16-bit DICOM pixels")
    span = hi - lo if hi > lo else max(abs(lo), 1.0) * 1e-3
    slope = float(_ds(span / QUANTIZATION_LEVELS * (1.0 + 1e-6)))
    intercept = float(_ds(lo))
    stored = np.round((data - intercept) / slope)
    if stored.min() < -0.5 or stored.max() > 65535.5:
        raise InputRejected(f"value range {lo}..{hi} cannot be quantized to 16 bits")
    return _Quantized(np.clip(stored, 0, 65535).astype(np.uint16), slope, intercept, False)


def _geometry(affine: npt.NDArray[np.float64]) -> _Geometry:
    """IOP, PixelSpacing and slice spacing from a ``(k, j, i)`` -> LPS affine."""
    col_step, row_step = affine[:3, 1], affine[:3, 2]
    row_spacing, col_spacing = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    row_dir, col_dir = row_step / col_spacing, col_step / row_spacing
    if abs(float(row_dir @ col_dir)) > 1e-4:
        raise InputRejected(
            "volume rows are not perpendicular to its columns (in-plane shear); "
            "DICOM ImageOrientationPatient cannot express it"
        )
    normal = np.cross(row_dir, col_dir)
    slice_spacing = abs(float(affine[:3, 0] @ normal))
    return _Geometry(
        orientation=[*row_dir.tolist(), *col_dir.tolist()],
        pixel_spacing=[row_spacing, col_spacing],
        slice_spacing=slice_spacing,
        normal=normal,
    )


def _sop_class(modality: str) -> str:
    """CT/MR Image Storage, else Secondary Capture."""
    return {"CT": CTImageStorage, "MR": MRImageStorage}.get(modality, SecondaryCaptureImageStorage)


def _copy_patient_study(template: Dataset, ds: Dataset) -> None:
    """Copy patient, study and frame-of-reference attributes; add empty Type 2 ones."""
    for keyword in _PATIENT_STUDY_KEYWORDS:
        if keyword in template:
            ds.add(template[keyword])
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in ds:
            setattr(ds, keyword, "")


def _add_modality_module(ds: Dataset, template: Dataset, modality: str) -> None:
    """Attributes required by the CT / MR / SC image modules."""
    if modality == "CT":
        ds.KVP = template.get("KVP", "")
        ds.AcquisitionNumber = template.get("AcquisitionNumber", "")
    elif modality == "MR":
        for keyword, default in _MR_KEYWORDS.items():
            value = template.get(keyword)
            if value in (None, ""):
                value = "" if default is None else default
            setattr(ds, keyword, value)
    else:
        ds.ConversionType = "WSD"


def _reference_item(sop_class_uid: str, sop_uid: str) -> Dataset:
    """SourceImageSequence item: class, instance and purpose of reference."""
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_uid
    purpose = Dataset()
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return item


def _references(
    ds: Dataset, sop_class_uid: str, sop_uids: Sequence[str], source_series_uid: str
) -> None:
    """SourceImageSequence and ReferencedSeriesSequence for the given source instances."""
    ds.SourceImageSequence = DicomSequence([_reference_item(sop_class_uid, u) for u in sop_uids])
    if not source_series_uid:
        return
    instances = []
    for uid in sop_uids:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class_uid
        ref.ReferencedSOPInstanceUID = uid
        instances.append(ref)
    series = Dataset()
    series.SeriesInstanceUID = source_series_uid
    series.ReferencedInstanceSequence = DicomSequence(instances)
    ds.ReferencedSeriesSequence = DicomSequence([series])


def _slice_sources(source_sop_uids: Sequence[str], n_slices: int, k: int) -> list[str]:
    """Source instances of slice ``k``: the k-th when counts match, else all (unique)."""
    uids = [u for u in source_sop_uids if u]
    if len(uids) == n_slices:
        return [uids[k]]
    return list(dict.fromkeys(uids))


def _window(volume: Volume, q: _Quantized) -> tuple[float, float]:
    """Window (center, width): soft tissue for CT, the full range otherwise."""
    if volume.modality == "CT" and volume.units == "HU":
        return CT_WINDOW
    lo = float(q.stored.min()) * q.slope + q.intercept
    hi = float(q.stored.max()) * q.slope + q.intercept
    return (lo + hi) / 2.0, max(hi - lo, 1.0)


def _series_dataset(
    volume: Volume,
    template: Dataset,
    uids: dict[str, str],
    series_description: str,
    derivation_description: str,
    series_number: int,
    now: dt.datetime,
) -> Dataset:
    """Attributes shared by every slice of the derived series."""
    modality = volume.modality if volume.modality in ("CT", "MR") else (volume.modality or "OT")
    ds = Dataset()
    _copy_patient_study(template, ds)
    ds.SOPClassUID = _sop_class(volume.modality)
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame_of_reference"]
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description[:64]
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.Manufacturer = "voxelgate"
    ds.ImageType = (
        ["DERIVED", "SECONDARY", "AXIAL"] if modality == "CT" else ["DERIVED", "SECONDARY"]
    )
    ds.DerivationDescription = derivation_description[:1024]
    _add_modality_module(ds, template, volume.modality)
    return ds


def _pixel_module(ds: Dataset, volume: Volume, q: _Quantized) -> None:
    """Image pixel module, rescale and window."""
    _, rows, columns = volume.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if q.signed else 0
    ds.RescaleIntercept = _ds(q.intercept)
    ds.RescaleSlope = _ds(q.slope)
    ds.RescaleType = "HU" if volume.units == "HU" else "US"
    center, width = _window(volume, q)
    ds.WindowCenter, ds.WindowWidth = _ds(center), _ds(width)


def _file_meta(sop_class_uid: str, sop_uid: str) -> FileMetaDataset:
    """Part 10 file meta information, Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _slice_dataset(
    base: Dataset, geometry: _Geometry, position: npt.NDArray[np.float64], k: int
) -> Dataset:
    """A new dataset sharing the series elements, with the slice's identity and position."""
    ds = Dataset()
    for element in base:
        ds.add(element)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in geometry.orientation]
    ds.PixelSpacing = [_ds(v) for v in geometry.pixel_spacing]
    ds.SliceThickness = _ds(geometry.slice_spacing)
    ds.SpacingBetweenSlices = _ds(geometry.slice_spacing)
    ds.SliceLocation = _ds(float(position @ geometry.normal))
    return ds


def _uids(volume: Volume, template: Dataset) -> dict[str, str]:
    """Study (kept, or new when empty), new series, frame of reference (kept or new)."""
    study = str(template.get("StudyInstanceUID", "") or "").strip()
    frame = volume.frame_of_reference_uid or str(template.get("FrameOfReferenceUID", "") or "")
    return {
        "study": study or generate_uid(),
        "series": generate_uid(),
        "frame_of_reference": frame.strip() or generate_uid(),
    }


def write_derived_series(
    volume: Volume,
    template: Dataset,
    source_sop_uids: list[str],
    source_sop_class_uid: str,
    out_dir: Path,
    series_description: str,
    derivation_description: str,
    series_number: int = 9001,
) -> list[Path]:
    """Write ``volume`` as a derived single-frame DICOM series into ``out_dir`` (atomically).

    Args:
        volume: Voxels ``[k, j, i]`` (HU for CT) and LPS affine.
        template: Source header (e.g. :attr:`DicomSeries.template`) for the patient/study modules.
            When its StudyInstanceUID is empty, a new StudyInstanceUID is generated.
        source_sop_uids: Source SOPInstanceUIDs; when there is one per slice, slice ``k``
            references the ``k``-th, otherwise every slice references all of them.
        source_sop_class_uid: SOP Class UID of the source instances.
        out_dir: Destination folder; replaced as a whole once every file is written.
        series_description: SeriesDescription (truncated to 64 characters).
        derivation_description: DerivationDescription (what was done).
        series_number: SeriesNumber of the new series.

    Returns:
        Paths of the written files, one per slice in ``k`` order (``IM_00001.dcm``...).

    Raises:
        InputRejected: Non-finite values, a value range that 16 bits cannot hold, or an in-plane
            shear.
    """
    out_dir = Path(out_dir)
    geometry = _geometry(volume.affine)
    q = _quantize(volume.array)
    uids = _uids(volume, template)
    base = _series_dataset(
        volume,
        template,
        uids,
        series_description,
        derivation_description,
        series_number,
        dt.datetime.now(),
    )
    _pixel_module(base, volume, q)
    source_series = str(template.get("SeriesInstanceUID", "") or "").strip()
    n_slices = volume.shape[0]
    names = [f"IM_{k + 1:05d}.dcm" for k in range(n_slices)]
    with atomic_dir(out_dir) as tmp:
        for k in range(n_slices):
            position = volume.affine[:3, :3] @ np.array([k, 0.0, 0.0]) + volume.affine[:3, 3]
            ds = _slice_dataset(base, geometry, position, k)
            sources = _slice_sources(source_sop_uids, n_slices, k)
            if sources:
                _references(ds, source_sop_class_uid, sources, source_series)
            ds.PixelData = q.stored[k].astype(q.stored.dtype.newbyteorder("<")).tobytes()
            ds["PixelData"].VR = "OW"
            ds.file_meta = _file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
            pydicom.dcmwrite(tmp / names[k], ds, enforce_file_format=True)
    return [out_dir / name for name in names]
