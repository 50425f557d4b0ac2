"""A float HU output named ``sct`` written from a real CT source is a calibrated derived CT series.

What a synthetic-CT pipeline relies on (issue 7): :func:`service.io.outputs.write_outputs` turns
``Result.volumes["sct"]`` into ``dicom/sct/``, a CT series with RescaleSlope/RescaleIntercept and
RescaleType HU, the source's FrameOfReferenceUID and StudyInstanceUID, ImageType
DERIVED\\SECONDARY, references to the source series and images, and values that read back
within 1 HU. The source is the real dcmqi three-slice CT, once as it is and once stripped of its
rescale tags (an uncalibrated CBCT-like source): the output's units come from the output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.result import Provenance, Result
from service.io.dicom_series import DicomSeries, load_dicom_series
from service.io.outputs import write_outputs


def _uncalibrated(ct3_dir: Path, out: Path) -> DicomSeries:
    out.mkdir()
    for path in sorted(ct3_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(out / path.name)
    return load_dicom_series(out)


@pytest.mark.parametrize("calibrated", [True, False], ids=["ct-source", "uncalibrated-source"])
def test_sct_is_a_calibrated_derived_ct(
    calibrated: bool, ct3_series: DicomSeries, ct3_dir: Path, tmp_path: Path
) -> None:
    source = ct3_series if calibrated else _uncalibrated(ct3_dir, tmp_path / "cbct")
    assert source.volume.units == ("HU" if calibrated else "")
    rng = np.random.default_rng(7)
    hu = ct3_series.volume.array.astype(np.float64) + rng.normal(0.0, 20.0, source.volume.shape)
    sct = source.volume.with_array(hu.astype(np.float32), units="HU", meta={})
    provenance = Provenance("cbct-to-sct", "0.0.0", "none", "test", {}, [])
    record = write_outputs(Result({"sct": sct}, {}, [], provenance), tmp_path / "out", source)

    files = sorted((tmp_path / "out" / "dicom" / "sct").iterdir())
    assert len(files) == 3
    assert {f"dicom/sct/{p.name}" for p in files} <= set(record["files"])
    template = source.template
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.Modality == "CT"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.RescaleType == "HU"
        assert "RescaleSlope" in ds
        assert "RescaleIntercept" in ds
        assert ds.FrameOfReferenceUID == template.FrameOfReferenceUID
        assert ds.StudyInstanceUID == template.StudyInstanceUID
        assert ds.SeriesInstanceUID != template.SeriesInstanceUID
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == template.SeriesInstanceUID
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.sop_instance_uids[k]
        assert ds.SeriesDescription == "sct (cbct-to-sct 0.0.0)"
    back = load_dicom_series(tmp_path / "out" / "dicom" / "sct").volume
    assert (back.modality, back.units) == ("CT", "HU")
    assert "hu_calibrated" not in back.meta
    assert back.frame_of_reference_uid == source.volume.frame_of_reference_uid
    np.testing.assert_allclose(back.affine, source.volume.affine, atol=1e-4)
    assert float(np.abs(back.array.astype(np.float64) - sct.array).max()) < 1.0
