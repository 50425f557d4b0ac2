"""LabelMap -> DICOM Segmentation (binary SEG) with highdicom, referencing the source series.

One segment per declared label, numbered ``1..n`` in increasing label value (DICOM SEG requires
consecutive segment numbers; :func:`segment_numbers` gives the mapping). Frame ``f`` of the SEG
is one (slice, segment) pair; its DerivationImageSequence and PlanePositionSequence name the
source instance of that slice, so a reader finds the source slice without geometry matching.
**Only non-empty frames are written** (highdicom's ``omit_empty_frames=True``, as dcmqi does):
a segment that covers 5 of 800 slices costs 5 frames. A declared label that is absent from the
array still gets its segment description (with no frames).

Geometry: the label map must lie on the source grid (same shape, affine equal within
:data:`GRID_TOLERANCE_MM`); the SEG then reuses the source's ImageOrientationPatient and
PixelSpacing, and slice ``k``'s ImagePositionPatient (LPS mm).
(Same grid: every grid corner within :data:`GRID_TOLERANCE_MM`.)

Provenance: each segment's SegmentAlgorithmType is ``AUTOMATIC`` and its
AlgorithmIdentificationSequence carries the algorithm name (AlgorithmName), version
(AlgorithmVersion), family (``DCM 123110 "Artificial Intelligence"``) and, when given, the weights
sha256 as AlgorithmParameters ``"weights_sha256=<hex>"``. The SeriesDescription is
``"<name> (<algorithm> <version>)"``; ContentDescription repeats the algorithm and version;
Manufacturer is ``voxelgate`` and SoftwareVersions the voxelgate code version.

Sources: a :class:`~service.io.dicom_series.DicomSeries` (classic single-frame series; the
header of each slice is rebuilt from the template with that slice's SOPInstanceUID and position)
or the source datasets themselves (headers suffice; they are put in slice order by position).
Enhanced multi-frame sources are refused for now. When the source StudyInstanceUID is empty
(loaded with ``allow_missing_study_uid``), ``study_uid`` or a new StudyInstanceUID is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from models.errors import InputRejected
from models.labels import TISSUE, CodedTerm, LabelInfo, LabelMap
from models.provenance import code_version
from service.io.atomic import atomic_file
from service.io.dicom_series import DicomSeries

GRID_TOLERANCE_MM = 0.01
"""Largest distance (mm) between label-map and source grid corners treated as the same grid."""

SEG_SERIES_NUMBER = 9101
"""SeriesNumber of written SEG objects."""

_PERSON_NAME_WARNING = ".*unlikely to represent the intended person name.*"
"""highdicom warns about single-component source PatientNames; the value is copied unchanged."""

_SLICE_KEYWORDS = ("SOPInstanceUID", "ImagePositionPatient", "InstanceNumber", "PixelData")


def segment_numbers(label_map: LabelMap) -> dict[int, int]:
    """Label value -> SEG segment number (``1..n`` in increasing value order)."""
    return {lab.value: n for n, lab in enumerate(label_map.labels, start=1)}


def _check_grid(
    label_map: LabelMap, affine: npt.NDArray[np.float64], shape: tuple[int, ...]
) -> None:
    """Refuse a label map that is not on the source grid."""
    if tuple(label_map.shape) != tuple(shape):
        raise InputRejected(
            f"label map shape {label_map.shape} differs from the source series {tuple(shape)}; "
            "resample the labels to the source grid (nearest neighbour) first"
        )
    corners = np.array(
        [
            [k, j, i, 1.0]
            for k in (0, shape[0] - 1)
            for j in (0, shape[1] - 1)
            for i in (0, shape[2] - 1)
        ]
    )
    moved = float(np.abs(corners @ (label_map.affine - affine).T).max())
    if moved > GRID_TOLERANCE_MM:
        raise InputRejected(
            f"label map geometry differs from the source series (grid corners {moved:.4g} mm "
            "apart); resample the labels to the source grid (nearest neighbour) first"
        )


def _empty_charset(element: DataElement) -> bool:
    """An empty SpecificCharacterSet (default repertoire), which highdicom refuses as a value."""
    return element.keyword == "SpecificCharacterSet" and not element.value


def _study_fallback(ds: Dataset, study_uid: str) -> None:
    """Fill an empty StudyInstanceUID."""
    if not str(ds.get("StudyInstanceUID", "") or "").strip():
        ds.StudyInstanceUID = study_uid


def _from_series(label_map: LabelMap, series: DicomSeries, study_uid: str) -> list[Dataset]:
    """One header per slice, rebuilt from the template (no pixel data)."""
    uids = series.sop_instance_uids
    if len(set(uids)) != len(uids):
        raise InputRejected(
            "the source is an enhanced multi-frame image; SEG/SR output for multi-frame "
            "sources is not supported yet"
        )
    volume = series.volume
    _check_grid(label_map, volume.affine, volume.shape)
    datasets: list[Dataset] = []
    for k, uid in enumerate(uids):
        ds = Dataset()
        for element in series.template:
            if element.keyword not in _SLICE_KEYWORDS and not _empty_charset(element):
                ds.add(element)
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = k + 1
        position = volume.affine[:3, 3] + k * volume.affine[:3, 0]
        ds.ImagePositionPatient = [float(f"{v:.6f}") for v in position]
        _study_fallback(ds, study_uid)
        datasets.append(ds)
    return datasets


def _from_datasets(
    label_map: LabelMap, datasets: Sequence[Dataset], study_uid: str
) -> list[Dataset]:
    """The given single-frame headers in slice order (matched to the label-map grid by IPP)."""
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise InputRejected(
            "the source is an enhanced multi-frame image; SEG/SR output for multi-frame "
            "sources is not supported yet"
        )
    n = label_map.shape[0]
    if len(datasets) != n:
        raise InputRejected(f"{len(datasets)} source instances for a label map of {n} slices")
    expected = label_map.affine[:3, 3] + np.arange(n)[:, None] * label_map.affine[:3, 0]
    step = float(np.linalg.norm(label_map.affine[:3, 0]))
    ordered: list[Dataset] = []
    for k in range(n):
        dist = [
            float(np.linalg.norm(np.asarray(ds.ImagePositionPatient, float) - expected[k]))
            for ds in datasets
        ]
        best = int(np.argmin(dist))
        if dist[best] > 0.1 * step:
            raise InputRejected(
                f"no source instance lies at slice {k} of the label map "
                f"(nearest is {dist[best]:.3g} mm away)"
            )
        ordered.append(datasets[best])
    if len({str(ds.SOPInstanceUID) for ds in ordered}) != n:
        raise InputRejected("source instances do not map one-to-one onto the label-map slices")
    return [_header_copy(ds, study_uid) for ds in ordered]


def _header_copy(ds: Dataset, study_uid: str) -> Dataset:
    """Shallow header copy: no pixel data or empty charset, an empty StudyInstanceUID filled."""
    out = Dataset()
    for element in ds:
        if element.keyword not in ("StudyInstanceUID", "PixelData") and not _empty_charset(element):
            out.add(element)
    out.StudyInstanceUID = str(ds.get("StudyInstanceUID", "") or "").strip() or study_uid
    return out


def source_datasets(
    label_map: LabelMap, source: DicomSeries | Sequence[Dataset], study_uid: str | None = None
) -> list[Dataset]:
    """Source image headers in slice (``k``) order, one per label-map slice.

    Args:
        label_map: Labels on the source grid.
        source: The loaded series, or its instances (pydicom datasets; headers suffice).
        study_uid: StudyInstanceUID to use when the source's is empty; a new one when ``None``.

    Returns:
        ``datasets[k]`` = header of the source instance of slice ``k``.

    Raises:
        InputRejected: Multi-frame source, or a label map that is not on the source grid.
    """
    fallback = study_uid or generate_uid()
    if isinstance(source, DicomSeries):
        return _from_series(label_map, source, fallback)
    return _from_datasets(label_map, list(source), fallback)


def _code(term: CodedTerm | None) -> hd.sr.CodedConcept:
    """The highdicom concept of a term (:data:`TISSUE` when ``None``)."""
    t = term or TISSUE
    return hd.sr.CodedConcept(value=t.value, scheme_designator=t.scheme, meaning=t.meaning)


def algorithm_identification(
    algorithm_name: str, algorithm_version: str, weights_sha256: str | None
) -> hd.AlgorithmIdentificationSequence:
    """AlgorithmIdentificationSequence: name, version, AI family, weights hash as a parameter."""
    params = {"weights_sha256": weights_sha256} if weights_sha256 else None
    return hd.AlgorithmIdentificationSequence(
        name=algorithm_name[:64],
        family=codes.DCM.ArtificialIntelligence,
        version=algorithm_version[:64],
        source="voxelgate",
        parameters=params,
    )


def _segment(
    number: int, label: LabelInfo, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    """Segment description of one label (tracking ID = label name, new tracking UID)."""
    colour = None if label.colour is None else hd.color.CIELabColor.from_rgb(*label.colour)
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label.name[:64],
        segmented_property_category=_code(label.category),
        segmented_property_type=_code(label.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=generate_uid(),
        tracking_id=label.name[:64],
        display_color=colour,
    )


def _segment_array(label_map: LabelMap) -> npt.NDArray[np.uint16]:
    """The label map with values replaced by segment numbers, shape ``(k, j, i)``."""
    lut = np.zeros(int(label_map.array.max(initial=0)) + 1, dtype=np.uint16)
    for value, number in segment_numbers(label_map).items():
        if value < lut.size:
            lut[value] = number
    return lut[label_map.array]


def build_dicom_seg(
    label_map: LabelMap,
    source: DicomSeries | Sequence[Dataset],
    algorithm_name: str,
    algorithm_version: str,
    weights_sha256: str | None = None,
    series_description: str | None = None,
    study_uid: str | None = None,
) -> hd.seg.Segmentation:
    """Build (without writing) the binary SEG of ``label_map``; see the module docstring.

    Args:
        label_map: Labels on the source grid; at least one declared label.
        source: The source series or its instance headers.
        algorithm_name: Algorithm (pipeline) name, stamped on every segment.
        algorithm_version: Its version.
        weights_sha256: sha256 of the weights, stored as an algorithm parameter.
        series_description: SeriesDescription; default ``"labels (<name> <version>)"``.
        study_uid: StudyInstanceUID when the source's is empty.

    Returns:
        The highdicom Segmentation (a pydicom Dataset).

    Raises:
        InputRejected: No declared label, multi-frame source, or labels off the source grid.
    """
    if not label_map.labels:
        raise InputRejected("a DICOM SEG needs at least one declared label")
    sources = source_datasets(label_map, source, study_uid)
    algorithm = algorithm_identification(algorithm_name, algorithm_version, weights_sha256)
    segments = [_segment(n, lab, algorithm) for n, lab in enumerate(label_map.labels, start=1)]
    description = series_description or f"labels ({algorithm_name} {algorithm_version})"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PERSON_NAME_WARNING)
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=_segment_array(label_map),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=generate_uid(),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="voxelgate",
            manufacturer_model_name=algorithm_name[:64],
            software_versions=code_version()[:64],
            device_serial_number="0",
            content_description=f"{algorithm_name} {algorithm_version}"[:64],
            content_label="SEGMENTATION",
            omit_empty_frames=True,
        )
    seg.SeriesDescription = description[:64]
    return seg


def write_dicom_seg(
    label_map: LabelMap,
    source: DicomSeries | Sequence[Dataset],
    algorithm_name: str,
    algorithm_version: str,
    out_path: Path,
    weights_sha256: str | None = None,
    series_description: str | None = None,
    study_uid: str | None = None,
) -> hd.seg.Segmentation:
    """Build the SEG (:func:`build_dicom_seg`) and write it to ``out_path`` atomically.

    Returns:
        The written Segmentation, e.g. for :func:`service.io.dicom_sr.write_measurement_sr` to
        reference its segments.
    """
    seg = build_dicom_seg(
        label_map,
        source,
        algorithm_name,
        algorithm_version,
        weights_sha256=weights_sha256,
        series_description=series_description,
        study_uid=study_uid,
    )
    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return seg
