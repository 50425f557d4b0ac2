"""Volume -> derived DICOM series -> Volume, and the content of the derived objects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.errors import InputRejected
from models.volume import Volume
from service.io.dicom_derived import write_derived_series
from service.io.dicom_series import DicomSeries, load_dicom_series

AXIAL = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0, 0, 0, 1.0]])
"""k along +z (the normal of IOP 1,0,0/0,1,0), j along +y, i along +x, 1 mm."""


def _write(series: DicomSeries, volume: Volume, out: Path, **kwargs: object) -> list[Path]:
    return write_derived_series(
        volume,
        series.template,
        series.sop_instance_uids,
        str(series.template.SOPClassUID),
        out,
        series_description=str(kwargs.get("series_description", "voxelgate test")),
        derivation_description="unit test copy",
    )


def test_real_ct_roundtrip_bit_exact(example_ct_series: DicomSeries, tmp_path: Path) -> None:
    volume = example_ct_series.volume
    files = _write(example_ct_series, volume, tmp_path / "out")
    assert len(files) == 20
    assert all(f.is_file() for f in files)
    back = load_dicom_series(tmp_path / "out")  # a new StudyInstanceUID: no opt-in needed
    assert back.volume.array.dtype == np.float32
    assert np.array_equal(back.volume.array, volume.array)
    assert np.abs(back.volume.affine - volume.affine).max() < 1e-6
    assert back.volume.frame_of_reference_uid == volume.frame_of_reference_uid
    assert back.volume.units == "HU"
    assert back.volume.modality == "CT"
    ds = pydicom.dcmread(files[0])
    assert ds.RescaleSlope == 1
    assert ds.RescaleIntercept == 0
    assert ds.PixelRepresentation == 1
    # The template had an empty StudyInstanceUID: a new one is generated for the whole series.
    study_uids = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in files}
    assert len(study_uids) == 1
    assert study_uids != {""}


def test_derived_object_content(ct3_series: DicomSeries, tmp_path: Path) -> None:
    files = _write(ct3_series, ct3_series.volume, tmp_path / "out", series_description="denoised")
    template = ct3_series.template
    datasets = [pydicom.dcmread(f) for f in files]
    ds = datasets[0]
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.StudyInstanceUID == template.StudyInstanceUID
    assert ds.FrameOfReferenceUID == template.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != template.SeriesInstanceUID
    assert ds.PatientID == template.PatientID
    assert ds.PatientName == template.PatientName
    assert ds.SeriesDescription == "denoised"
    assert ds.SeriesNumber == 9001
    assert ds.DerivationDescription == "unit test copy"
    assert "WindowCenter" in ds
    assert "WindowWidth" in ds
    assert len({d.SOPInstanceUID for d in datasets}) == 3
    assert not {d.SOPInstanceUID for d in datasets} & set(ct3_series.sop_instance_uids)
    for k, d in enumerate(datasets):
        assert d.SourceImageSequence[0].ReferencedSOPInstanceUID == ct3_series.sop_instance_uids[k]
        ref_series = d.ReferencedSeriesSequence[0]
        assert ref_series.SeriesInstanceUID == template.SeriesInstanceUID
        assert (
            ref_series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
            == (ct3_series.sop_instance_uids[k])
        )
        expected_ipp = ct3_series.volume.index_to_lps([[k, 0, 0]])[0]
        assert np.allclose([float(v) for v in d.ImagePositionPatient], expected_ipp, atol=1e-4)
        assert [float(v) for v in d.PixelSpacing] == pytest.approx([0.810547, 0.810547])
        assert float(d.SpacingBetweenSlices) == pytest.approx(1.0)
    back = load_dicom_series(tmp_path / "out")
    assert np.array_equal(back.volume.array, ct3_series.volume.array)
    assert back.volume.meta["study_instance_uid"] == template.StudyInstanceUID


def test_anisotropic_pixel_spacing_order(ct3_series: DicomSeries, tmp_path: Path) -> None:
    # k along +z (1.5 mm), rows j along +y (0.4 mm apart), columns i along +x (0.9 mm apart).
    affine = np.array(
        [[0.0, 0.0, 0.9, -5.0], [0.0, 0.4, 0.0, 7.0], [1.5, 0.0, 0.0, 9.0], [0, 0, 0, 1.0]]
    )
    volume = Volume(ct3_series.volume.array[:, :64, :80].copy(), affine, modality="CT", units="HU")
    files = _write(ct3_series, volume, tmp_path / "aniso")
    ds = pydicom.dcmread(files[0])
    assert (ds.Rows, ds.Columns) == (64, 80)
    assert [float(v) for v in ds.PixelSpacing] == [0.4, 0.9]  # [row spacing, column spacing]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert [float(v) for v in ds.ImagePositionPatient] == [-5.0, 7.0, 9.0]
    back = load_dicom_series(tmp_path / "aniso").volume
    assert np.allclose(back.affine, affine)
    assert np.array_equal(back.array, volume.array)


def test_non_integral_values_within_half_slope(
    example_ct_series: DicomSeries, tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    base = example_ct_series.volume.array[:4, :128, :128]
    noisy = (base + rng.normal(0.0, 3.0, base.shape)).astype(np.float32)
    volume = Volume(noisy, example_ct_series.volume.affine, modality="CT", units="HU")
    files = _write(example_ct_series, volume, tmp_path / "noisy")
    ds = pydicom.dcmread(files[0])
    slope = float(ds.RescaleSlope)
    assert 0.0 < slope < 0.1
    back = load_dicom_series(tmp_path / "noisy").volume
    error = np.abs(back.array.astype(np.float64) - noisy.astype(np.float64)).max()
    assert error <= slope / 2 + 1e-3  # float32 output rounding on values ~1000 HU


def test_large_integral_range_uses_uint16_offset(ct3_series: DicomSeries, tmp_path: Path) -> None:
    data = np.linspace(30000, 60000, 3 * 8 * 8).reshape(3, 8, 8).round().astype(np.float32)
    volume = Volume(data, AXIAL, modality="MR")
    files = _write(ct3_series, volume, tmp_path / "mr")
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage
    assert ds.PixelRepresentation == 0
    assert float(ds.RescaleSlope) == 1.0
    back = load_dicom_series(tmp_path / "mr").volume
    assert np.array_equal(back.array, data)


def test_other_modality_written_as_secondary_capture(
    ct3_series: DicomSeries, tmp_path: Path
) -> None:
    volume = Volume(np.zeros((2, 4, 4), np.uint8), AXIAL, modality="OT")
    ds = pydicom.dcmread(_write(ct3_series, volume, tmp_path / "sc")[0])
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage


def test_non_finite_values_are_refused(ct3_series: DicomSeries, tmp_path: Path) -> None:
    data = np.zeros((2, 4, 4), np.float32)
    data[0, 0, 0] = np.nan
    with pytest.raises(InputRejected, match="NaN"):
        _write(ct3_series, Volume(data, AXIAL, modality="CT", units="HU"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_in_plane_shear_is_refused(ct3_series: DicomSeries, tmp_path: Path) -> None:
    affine = AXIAL.copy()
    affine[0, 1] = 0.5  # the row step gets a component along x (the columns): not perpendicular
    volume = Volume(np.zeros((2, 4, 4), np.int16), affine, modality="CT", units="HU")
    with pytest.raises(InputRejected, match="in-plane shear"):
        _write(ct3_series, volume, tmp_path / "shear")
