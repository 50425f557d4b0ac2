"""Label maps -> DICOM SEG and TID 1500 SR on the real dcmqi three-slice CT.

The SEG is re-read with highdicom and checked frame by frame against the source series' instance
UIDs in slice order; its essential attributes are compared with dcmqi's own SEG of the same CT
(``liver.dcm``), whose pixels in our slice order equal dcmqi's ``liver_seg.nrrd``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.sr.codedict import codes

from models.errors import InputRejected
from models.labels import CodedTerm, LabelInfo, LabelMap
from models.result import Provenance, Result
from service.io.dicom_seg import segment_numbers, write_dicom_seg
from service.io.dicom_series import DicomSeries
from service.io.dicom_sr import write_measurement_sr
from service.io.nifti import read_nifti
from service.io.outputs import write_outputs
from service.io.read_any import read_volume

BONE = CodedTerm("272673000", "SCT", "Bone")
ALGO, VERSION, WEIGHTS = "segment-test", "0.0.1", "ab" * 32


def _body_bone(series: DicomSeries) -> LabelMap:
    """Body (HU > -300) = 1 and bone (HU > 300) = 7 on the CT; slice 1 keeps only bone; 9 absent."""
    hu = series.volume.array
    array = np.zeros(hu.shape, dtype=np.uint8)
    array[hu > -300] = 1
    array[hu > 300] = 7
    array[1][array[1] == 1] = 0
    labels = (
        LabelInfo(1, "Body", colour=(200, 150, 100)),
        LabelInfo(
            7, "Bone", category=CodedTerm("91723000", "SCT", "Anatomical Structure"), type=BONE
        ),
        LabelInfo(9, "Absent"),
    )
    return LabelMap.on_grid(series.volume, array, labels)


def _frame_source_uid(frame: pydicom.Dataset) -> str:
    return str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)


def _values(seg: hd.seg.Segmentation, uids: list[str], lm: LabelMap) -> npt.NDArray[np.int64]:
    """SEG pixels by source instance (in slice order), mapped back to label values."""
    px = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, relabel=False
    )
    back = np.zeros(max(segment_numbers(lm).values()) + 1, dtype=np.int64)
    for value, number in segment_numbers(lm).items():
        back[number] = value
    return back[px]


# -- LabelMap ---------------------------------------------------------------------------------


def test_label_map_validation_and_volumes(ct3_series: DicomSeries) -> None:
    lm = _body_bone(ct3_series)
    vols = lm.volumes_ml()
    voxel_ml = 0.810547 * 0.810547 * 1.0 / 1000.0
    assert vols["Bone"].voxel_count == int((lm.array == 7).sum()) > 0
    assert vols["Body"].volume_ml == pytest.approx(int((lm.array == 1).sum()) * voxel_ml, rel=1e-6)
    assert vols["Absent"] == dataclasses.replace(vols["Absent"], voxel_count=0, volume_ml=0.0)

    bad = lm.array.copy()
    bad[0, 0, 0], bad[0, 0, 1] = 3, 250
    with pytest.raises(InputRejected, match=r"values \[3, 250\] that no label declares"):
        LabelMap.on_grid(ct3_series.volume, bad, lm.labels)
    with pytest.raises(InputRejected, match="integer array"):
        LabelMap.on_grid(ct3_series.volume, lm.array.astype(np.float32), lm.labels)
    with pytest.raises(InputRejected, match="integer array"):
        LabelMap.on_grid(ct3_series.volume, lm.array > 0, lm.labels)
    with pytest.raises(InputRejected, match="outside"):
        LabelMap.on_grid(ct3_series.volume, lm.array.astype(np.int16) - 1, lm.labels)
    with pytest.raises(InputRejected, match=r"outside 1\.\.65535"):
        LabelInfo(0, "background")
    with pytest.raises(InputRejected, match="declared twice"):
        LabelMap.on_grid(ct3_series.volume, lm.array, (*lm.labels, LabelInfo(7, "Again")))


# -- SEG --------------------------------------------------------------------------------------


def test_seg_frames_land_on_their_source_slices(ct3_series: DicomSeries, tmp_path: Path) -> None:
    lm = _body_bone(ct3_series)
    uids = ct3_series.sop_instance_uids
    write_dicom_seg(lm, ct3_series, ALGO, VERSION, tmp_path / "seg.dcm", weights_sha256=WEIGHTS)
    seg = hd.seg.segread(tmp_path / "seg.dcm")

    assert seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == ct3_series.volume.frame_of_reference_uid
    assert seg.StudyInstanceUID == ct3_series.template.StudyInstanceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == ct3_series.template.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == set(uids)

    # Every frame names the source instance of the slice at its position; empty frames omitted.
    positions = [ct3_series.volume.index_to_lps([k, 0, 0]) for k in range(3)]
    seen = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ipp = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        k = int(np.argmin([np.linalg.norm(ipp - p) for p in positions]))
        assert np.allclose(ipp, positions[k], atol=1e-4)
        assert _frame_source_uid(frame) == uids[k]
        seen.add((k, int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)))
    assert seen == {(0, 1), (2, 1), (0, 2), (1, 2), (2, 2)}  # Body absent from slice 1
    assert seg.NumberOfFrames == 5

    assert np.array_equal(_values(seg, uids, lm), lm.array)

    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert [segments[n].SegmentLabel for n in (1, 2, 3)] == ["Body", "Bone", "Absent"]
    assert segments[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == BONE.value
    algo = segments[1].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == (ALGO, VERSION)
    assert algo.AlgorithmParameters == f"weights_sha256={WEIGHTS}"
    assert segments[1].SegmentAlgorithmType == "AUTOMATIC"


def test_seg_from_source_files_in_any_order(
    ct3_series: DicomSeries, ct3_dir: Path, tmp_path: Path
) -> None:
    lm = _body_bone(ct3_series)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(ct3_dir.glob("*.dcm"))]
    random.Random(3).shuffle(headers)
    write_dicom_seg(lm, headers, ALGO, VERSION, tmp_path / "seg.dcm")
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert np.array_equal(_values(seg, ct3_series.sop_instance_uids, lm), lm.array)


def test_seg_matches_dcmqi_liver(ct3_series: DicomSeries, ct3_dir: Path, tmp_path: Path) -> None:
    dcmqi_dir = ct3_dir.parent
    theirs = hd.seg.segread(dcmqi_dir / "liver.dcm")
    nrrd = read_volume(dcmqi_dir / "liver_seg.nrrd").volume
    uids = ct3_series.sop_instance_uids
    their_px = theirs.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        combine_segments=True,
        relabel=False,
        ignore_spatial_locations=True,  # dcmqi does not state SpatialLocationsPreserved
    )
    assert np.array_equal(their_px, nrrd.array)  # our slice order = dcmqi's geometry

    their_seg = theirs.SegmentSequence[0]

    def term(seq: pydicom.Sequence) -> CodedTerm:
        return CodedTerm(seq[0].CodeValue, seq[0].CodingSchemeDesignator, seq[0].CodeMeaning)

    liver = LabelInfo(
        1,
        their_seg.SegmentLabel,
        category=term(their_seg.SegmentedPropertyCategoryCodeSequence),
        type=term(their_seg.SegmentedPropertyTypeCodeSequence),
    )
    lm = LabelMap.on_grid(ct3_series.volume, nrrd.array.astype(np.uint8), (liver,))
    write_dicom_seg(lm, ct3_series, ALGO, VERSION, tmp_path / "liver.dcm")
    ours = hd.seg.segread(tmp_path / "liver.dcm")

    for keyword in ("SOPClassUID", "SegmentationType", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert ours.get(keyword) == theirs.get(keyword), keyword
    assert (ours.Rows, ours.Columns, ours.NumberOfFrames) == (
        theirs.Rows,
        theirs.Columns,
        theirs.NumberOfFrames,
    )
    ours_seg = ours.SegmentSequence[0]
    for keyword in (
        "SegmentNumber",
        "SegmentLabel",
        "SegmentedPropertyCategoryCodeSequence",
        "SegmentedPropertyTypeCodeSequence",
    ):
        assert ours_seg.get(keyword) == their_seg.get(keyword), keyword

    def refs(ds: pydicom.Dataset) -> tuple[str, set[str]]:
        item = ds.ReferencedSeriesSequence[0]
        return item.SeriesInstanceUID, {
            r.ReferencedSOPInstanceUID for r in item.ReferencedInstanceSequence
        }

    assert refs(ours) == refs(theirs)
    shared_ours, shared_theirs = (d.SharedFunctionalGroupsSequence[0] for d in (ours, theirs))
    assert np.allclose(
        shared_ours.PixelMeasuresSequence[0].PixelSpacing,
        shared_theirs.PixelMeasuresSequence[0].PixelSpacing,
    )
    assert np.allclose(
        shared_ours.PlaneOrientationSequence[0].ImageOrientationPatient,
        shared_theirs.PlaneOrientationSequence[0].ImageOrientationPatient,
    )
    # Same frames on the same source slices, same pixels.
    assert sorted(_frame_source_uid(f) for f in ours.PerFrameFunctionalGroupsSequence) == sorted(
        _frame_source_uid(f) for f in theirs.PerFrameFunctionalGroupsSequence
    )
    our_px = ours.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, relabel=False
    )
    assert np.array_equal(our_px, their_px)


def test_seg_refuses_labels_off_the_source_grid(ct3_series: DicomSeries, tmp_path: Path) -> None:
    lm = _body_bone(ct3_series)
    shifted = dataclasses.replace(lm, affine=lm.affine + np.array([[0, 0, 0, 0.5]] * 3 + [[0] * 4]))
    with pytest.raises(InputRejected, match="geometry differs"):
        write_dicom_seg(shifted, ct3_series, ALGO, VERSION, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()
    cropped = LabelMap(array=lm.array[:2], affine=lm.affine, labels=lm.labels)
    with pytest.raises(InputRejected, match="shape"):
        write_dicom_seg(cropped, ct3_series, ALGO, VERSION, tmp_path / "seg.dcm")


# -- SR ---------------------------------------------------------------------------------------


def test_sr_reports_the_volume_of_each_segment(ct3_series: DicomSeries, tmp_path: Path) -> None:
    lm = _body_bone(ct3_series)
    seg = write_dicom_seg(lm, ct3_series, ALGO, VERSION, tmp_path / "seg.dcm")
    write_measurement_sr(
        lm, ct3_series, ALGO, VERSION, tmp_path / "sr.dcm", segmentation=seg, weights_sha256=WEIGHTS
    )
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    assert sr.StudyInstanceUID == ct3_series.template.StudyInstanceUID
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 3
    tracking = {str(s.TrackingUID): s for s in seg.SegmentSequence}
    volumes = lm.volumes_ml()
    for group in groups:
        segment = tracking[str(group.tracking_uid)]
        assert group.tracking_identifier == segment.TrackingID
        assert group.referenced_segment.referenced_segment_numbers == [segment.SegmentNumber]
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        (measurement,) = group.get_measurements(name=codes.SCT.Volume)
        assert (measurement.unit.value, measurement.unit.scheme_designator) == ("ml", "UCUM")
        assert measurement.value == pytest.approx(volumes[segment.SegmentLabel].volume_ml)
        assert group.finding_type.value == segment.SegmentedPropertyTypeCodeSequence[0].CodeValue
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {*ct3_series.sop_instance_uids, seg.SOPInstanceUID}


def test_sr_without_seg_references_the_source(ct3_series: DicomSeries, tmp_path: Path) -> None:
    lm = _body_bone(ct3_series)
    write_measurement_sr(lm, ct3_series, ALGO, VERSION, tmp_path / "sr.dcm")
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    groups = sr.content.get_image_measurement_groups()
    volumes = lm.volumes_ml()
    assert sorted(g.tracking_identifier for g in groups) == sorted(volumes)
    for group in groups:
        (measurement,) = group.get_measurements(name=codes.SCT.Volume)
        assert measurement.value == pytest.approx(volumes[group.tracking_identifier].volume_ml)
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == set(ct3_series.sop_instance_uids)


# -- write_outputs ----------------------------------------------------------------------------


def _result(lm: LabelMap) -> Result:
    prov = Provenance(
        pipeline=ALGO,
        version=VERSION,
        weights_sha256=WEIGHTS,
        code_version="test",
        parameters={},
        input_uids=[],
    )
    return Result(
        volumes={}, measurements={}, figures=[], provenance=prov, label_maps={"organs": lm}
    )


def test_write_outputs_with_a_label_map(ct3_series: DicomSeries, tmp_path: Path) -> None:
    lm = _body_bone(ct3_series)
    record = write_outputs(_result(lm), tmp_path / "out", ct3_series)
    out = tmp_path / "out"
    for name in (
        "organs.nii.gz",
        "organs_labels.json",
        "dicom/organs_seg/organs_seg.dcm",
        "dicom/organs_sr/organs_sr.dcm",
    ):
        assert name in record["files"], name
        assert (out / name).is_file(), name
    assert json.loads((out / "result.json").read_text()) == record

    back = read_nifti(out / "organs.nii.gz")
    assert np.issubdtype(back.array.dtype, np.integer)
    assert np.array_equal(back.array, lm.array)
    assert np.allclose(back.affine, lm.affine, atol=1e-5)
    table = json.loads((out / "organs_labels.json").read_text())
    assert [(t["value"], t["name"]) for t in table["labels"]] == [
        (1, "Body"),
        (7, "Bone"),
        (9, "Absent"),
    ]
    assert table["labels"][1]["type"] == [BONE.value, BONE.scheme, BONE.meaning]

    per_label = record["label_maps"]["organs"]
    for name, v in lm.volumes_ml().items():
        assert per_label[name] == {
            "value": v.value,
            "voxel_count": v.voxel_count,
            "volume_ml": pytest.approx(v.volume_ml),
        }

    seg = hd.seg.segread(out / "dicom" / "organs_seg" / "organs_seg.dcm")
    assert np.array_equal(_values(seg, ct3_series.sop_instance_uids, lm), lm.array)
    assert seg.SeriesDescription == f"organs ({ALGO} {VERSION})"
    sr = hd.sr.srread(out / "dicom" / "organs_sr" / "organs_sr.dcm")
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == 3


def test_write_outputs_without_dicom_source(ct3_series: DicomSeries, tmp_path: Path) -> None:
    record = write_outputs(_result(_body_bone(ct3_series)), tmp_path / "out", None)
    assert sorted(record["files"]) == ["organs.nii.gz", "organs_labels.json"]
    assert record["label_maps"]["organs"]["Bone"]["voxel_count"] > 0


def test_write_outputs_is_atomic_when_a_label_map_is_refused(
    ct3_series: DicomSeries, tmp_path: Path
) -> None:
    lm = _body_bone(ct3_series)
    off_grid = dataclasses.replace(lm, affine=lm.affine @ np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(InputRejected, match="geometry differs"):
        write_outputs(_result(off_grid), tmp_path / "out", ct3_series)
    assert list(tmp_path.iterdir()) == []
