"""``voxelgate run cbct-to-sct CBCT OUT --reference CT`` end to end through the CLI and runner.

The real TotalSegmentator CT (small, 3 mm) written as a NIfTI declared CT/HU by our writer
stands in for both the CBCT and the planning CT (``method=identity``: the sCT is the CBCT, so
it matches the reference exactly). A CT DICOM series without rescale tags is refused with the
reason the loader recorded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from service.cli import main
from service.io.dicom_series import UNCALIBRATED_CT_NOTE
from service.io.nifti import read_nifti, write_nifti


@pytest.fixture
def ct_nifti(shared_file: Callable[[str], Path], tmp_path: Path) -> Path:
    """example_ct_sm.nii.gz declared CT in HU (a plain NIfTI reads as modality OT)."""
    volume = read_nifti(shared_file("totalsegmentator/example_ct_sm.nii.gz"))
    path = tmp_path / "ct_hu.nii.gz"
    write_nifti(dataclasses.replace(volume, modality="CT", units="HU"), path)
    return path


def test_identity_with_reference(ct_nifti: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["run", "cbct-to-sct", str(ct_nifti), str(out), "--reference", str(ct_nifti)]
    assert main([*args, "-p", "method=identity", "-q"]) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["provenance"]["pipeline"] == "cbct-to-sct"
    assert record["provenance"]["parameters"]["method"] == "identity"
    m = record["measurements"]
    assert m["method"] == "identity"
    assert m["body_mask_source"] == "reference CT"
    assert m["metrics"]["sct"]["mae_hu"] == pytest.approx(0.0, abs=1e-6)
    assert "sct.nii.gz" in record["files"]
    sct = read_nifti(out / "sct.nii.gz")
    assert (sct.modality, sct.units) == ("CT", "HU")
    assert sct.shape == read_nifti(ct_nifti).shape


def test_without_reference(ct_nifti: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["run", "cbct-to-sct", str(ct_nifti), str(out), "-p", "method=identity", "-q"]) == 0
    m = json.loads((out / "result.json").read_text())["measurements"]
    assert m["reference"] == {"given": False}
    assert "metrics" not in m


def test_uncalibrated_dicom_cbct_is_refused_with_the_reason(
    ct3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cbct = tmp_path / "cbct"
    cbct.mkdir()
    for path in sorted(ct3_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(cbct / path.name)
    out = tmp_path / "out"
    assert main(["run", "cbct-to-sct", str(cbct), str(out), "-p", "method=identity", "-q"]) == 2
    err = capsys.readouterr().err
    assert "input_rejected" in err
    assert "the CBCT is not in HU" in err
    assert f"input 'image': {UNCALIBRATED_CT_NOTE}" in err
    assert not out.exists()
