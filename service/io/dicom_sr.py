"""LabelMap -> DICOM SR measurement report (TID 1500) with highdicom: one volume per label.

The report is a Comprehensive 3D SR (``MeasurementReport``, TID 1500) with a device observer
(the algorithm) and, per declared label, one measurement group:

* with a SEG (``segmentation`` given): a TID 1411 *volumetric ROI* group whose ReferencedSegment
  names the SEG instance and the label's segment number (and, through it, the source series);
  tracking identifier and tracking UID are the segment's (TrackingID / TrackingUID), so the SR
  group and the SEG segment are the same finding;
* without a SEG: a TID 1501 group that references the source series instances directly, with a
  new tracking UID and the label name as tracking identifier.

Each group holds one measurement: ``SCT 118565006 "Volume"`` in mL (UCUM ``ml``), equal to
:meth:`models.labels.LabelMap.volumes_ml` (voxel count times ``|det(affine)|`` mm³ / 1000), the
finding type (the label's SNOMED-CT type, ``Tissue`` when none), finding category (the label's
category, when declared) and the algorithm identification (name, version, weights sha256 as a
parameter). Labels absent from the map are reported with 0 mL.

The SR joins the source study; with an empty source StudyInstanceUID it takes the SEG's
StudyInstanceUID (so SEG and SR stay in one study), else a new one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from models.errors import InputRejected
from models.labels import TISSUE, CodedTerm, LabelInfo, LabelMap
from service.io.atomic import atomic_file
from service.io.dicom_seg import segment_numbers, source_datasets
from service.io.dicom_series import DicomSeries

SR_SERIES_NUMBER = 9102
"""SeriesNumber of written SR objects."""

MILLILITER = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
"""UCUM unit of the volume measurements."""

_PERSON_NAME_WARNING = ".*unlikely to represent the intended person name.*"


def _code(term: CodedTerm | None) -> hd.sr.CodedConcept:
    """The highdicom concept of a term (:data:`TISSUE` when ``None``)."""
    t = term or TISSUE
    return hd.sr.CodedConcept(value=t.value, scheme_designator=t.scheme, meaning=t.meaning)


def _segment_tracking(segmentation: Dataset) -> dict[int, tuple[str, str]]:
    """Segment number -> (TrackingID, TrackingUID) of a SEG."""
    out: dict[int, tuple[str, str]] = {}
    for item in segmentation.SegmentSequence:
        number = int(item.SegmentNumber)
        out[number] = (
            str(item.get("TrackingID", "") or item.SegmentLabel),
            str(item.get("TrackingUID", "") or generate_uid()),
        )
    return out


def _algorithm(
    name: str, version: str, weights_sha256: str | None
) -> hd.sr.AlgorithmIdentification:
    """TID 4019 algorithm identification."""
    params = [f"weights_sha256={weights_sha256}"] if weights_sha256 else None
    return hd.sr.AlgorithmIdentification(name=name[:64], version=version[:64], parameters=params)


def _volume_measurement(
    volume_ml: float, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.Measurement:
    """TID 300 Volume measurement in mL."""
    return hd.sr.Measurement(
        name=codes.SCT.Volume,
        value=float(volume_ml),
        unit=MILLILITER,
        algorithm_id=algorithm,
    )


def _group(
    label: LabelInfo,
    volume_ml: float,
    algorithm: hd.sr.AlgorithmIdentification,
    sources: list[Dataset],
    segmentation: Dataset | None,
    tracking: dict[int, tuple[str, str]],
    number: int,
) -> (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
):
    """Measurement group of one label (see the module docstring)."""
    measurement = _volume_measurement(volume_ml, algorithm)
    category = None if label.category is None else _code(label.category)
    if segmentation is not None:
        tracking_id, tracking_uid = tracking[number]
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=tracking_id),
            referenced_segment=_referenced_segment(segmentation, number, sources),
            finding_type=_code(label.type),
            finding_category=category,
            algorithm_id=algorithm,
            measurements=[measurement],
        )
    images = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=label.name),
        finding_type=_code(label.type),
        finding_category=category,
        algorithm_id=algorithm,
        measurements=[measurement],
        source_images=images,
    )


def _referenced_segment(
    segmentation: Dataset, number: int, sources: list[Dataset]
) -> hd.sr.ReferencedSegment:
    """Reference to one segment: its frames and source images, or (empty segment) the series."""
    has_frames = any(
        int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == number
        for fg in segmentation.get("PerFrameFunctionalGroupsSequence", [])
    )
    if has_frames:
        return hd.sr.ReferencedSegment.from_segmentation(segmentation, number)
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(segmentation.SOPClassUID),
        sop_instance_uid=str(segmentation.SOPInstanceUID),
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(str(sources[0].SeriesInstanceUID)),
    )


def _check_segmentation(label_map: LabelMap, segmentation: Dataset) -> None:
    """The SEG must describe exactly the label map's labels, numbered as :func:`segment_numbers`."""
    described = {int(s.SegmentNumber): str(s.SegmentLabel) for s in segmentation.SegmentSequence}
    expected = {n: label_map.label(v).name[:64] for v, n in segment_numbers(label_map).items()}
    if described != expected:
        raise InputRejected(
            f"the SEG's segments {described} do not match the label map's labels {expected}"
        )


def build_measurement_sr(
    label_map: LabelMap,
    source: DicomSeries | Sequence[Dataset],
    algorithm_name: str,
    algorithm_version: str,
    segmentation: Dataset | None = None,
    weights_sha256: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build (without writing) the TID 1500 measurement report of ``label_map``.

    Args:
        label_map: Labels on the source grid; at least one declared label.
        source: The source series or its instance headers.
        algorithm_name: Algorithm (pipeline) name: device observer name and algorithm ID.
        algorithm_version: Its version.
        segmentation: The SEG written for ``label_map`` (e.g. from
            :func:`service.io.dicom_seg.write_dicom_seg`); its segments are referenced.
        weights_sha256: sha256 of the weights, stored as an algorithm parameter.

    Returns:
        The highdicom Comprehensive 3D SR (a pydicom Dataset).

    Raises:
        InputRejected: No declared label, a SEG whose segments differ from the labels, a
            multi-frame source, or labels off the source grid.
    """
    if not label_map.labels:
        raise InputRejected("a measurement report needs at least one declared label")
    if segmentation is not None:
        _check_segmentation(label_map, segmentation)
    study_uid = None if segmentation is None else str(segmentation.StudyInstanceUID)
    sources = source_datasets(label_map, source, study_uid)
    algorithm = _algorithm(algorithm_name, algorithm_version, weights_sha256)
    tracking = {} if segmentation is None else _segment_tracking(segmentation)
    volumes = label_map.volumes_ml()
    numbers = segment_numbers(label_map)
    groups = [
        _group(lab, volumes[lab.name].volume_ml, algorithm, sources, segmentation, tracking, n)
        for lab in label_map.labels
        for n in (numbers[lab.value],)
    ]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=algorithm_name[:64], manufacturer_name="voxelgate"
        ),
    )
    procedure = (
        codes.LN.CTUnspecifiedBodyRegion
        if str(sources[0].get("Modality", "")) == "CT"
        else codes.SCT.ImagingProcedure
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    evidence = [*sources, *([segmentation] if segmentation is not None else [])]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PERSON_NAME_WARNING)
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=generate_uid(),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="voxelgate",
            is_complete=True,
        )
    sr.SeriesDescription = f"volumes ({algorithm_name} {algorithm_version})"[:64]
    return sr


def write_measurement_sr(
    label_map: LabelMap,
    source: DicomSeries | Sequence[Dataset],
    algorithm_name: str,
    algorithm_version: str,
    out_path: Path,
    segmentation: Dataset | None = None,
    weights_sha256: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the report (:func:`build_measurement_sr`) and write it to ``out_path`` atomically.

    Returns:
        The written SR dataset.
    """
    sr = build_measurement_sr(
        label_map,
        source,
        algorithm_name,
        algorithm_version,
        segmentation=segmentation,
        weights_sha256=weights_sha256,
    )
    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return sr
