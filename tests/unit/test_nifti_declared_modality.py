"""A declared modality (``voxelgate run --modality``, the loader's ``declare_modality``).

``example_ct_sm.nii.gz`` is a real plain NIfTI CT not written by voxelgate: it reads as modality
``OT`` without units, so ``cbct-to-sct`` (CT in HU only) refuses it unless it is declared CT.
The same voxels written by our writer with modality MR stand in for a file whose own header
names another modality; the uncalibrated DICOM CT (rescale tags removed) for a file that names
CT but is not HU.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.errors import InputRejected
from service.cli import main
from service.io.nifti import read_nifti, write_nifti
from service.io.read_any import declare_modality, read_volume


@pytest.fixture
def plain_ct(shared_file: Callable[[str], Path]) -> Path:
    path = shared_file("totalsegmentator/example_ct_sm.nii.gz")
    volume = read_nifti(path)
    assert (volume.modality, volume.units) == ("OT", ""), "must be a NIfTI without our header"
    return path


@pytest.fixture
def mr_nifti(plain_ct: Path, tmp_path: Path) -> Path:
    path = tmp_path / "labelled_mr.nii.gz"
    write_nifti(dataclasses.replace(read_nifti(plain_ct), modality="MR"), path)
    return path


# --- the rule ---


def test_declared_ct_makes_an_ot_volume_hu(plain_ct: Path) -> None:
    raw = read_nifti(plain_ct)
    assert raw.array.dtype == np.int16
    ct = declare_modality(raw, "ct", str(plain_ct))
    assert (ct.modality, ct.units) == ("CT", "HU")
    assert ct.array.dtype == np.float32
    np.testing.assert_array_equal(ct.array, raw.array)
    np.testing.assert_array_equal(ct.affine, raw.affine)
    mr = declare_modality(raw, "MR", str(plain_ct))
    assert (mr.modality, mr.units) == ("MR", "")
    assert declare_modality(raw, None, "x") is raw
    assert declare_modality(raw, "", "x") is raw
    assert read_volume(plain_ct, modality="CT").volume.units == "HU"


def test_a_file_naming_another_modality_is_refused(mr_nifti: Path) -> None:
    with pytest.raises(InputRejected, match="declared modality CT, but the file says it is MR"):
        read_volume(mr_nifti, modality="CT")
    assert read_volume(mr_nifti, modality="MR").volume.modality == "MR"


def test_a_file_naming_the_declared_modality_keeps_its_units(ct3_dir: Path, tmp_path: Path) -> None:
    """Declaring CT does not make an uncalibrated DICOM CT (no Rescale tags) HU."""
    folder = tmp_path / "uncalibrated"
    folder.mkdir()
    for path in sorted(ct3_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(folder / path.name)
    volume = read_volume(folder, modality="CT").volume
    assert (volume.modality, volume.units) == ("CT", "")


# --- voxelgate run --modality ---


def _run(*args: str) -> int:
    return main(["run", "cbct-to-sct", *args, "-p", "method=identity", "-q"])


def test_run_with_declared_ct_succeeds(plain_ct: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(str(plain_ct), str(out), "--modality", "CT") == 0
    sct = read_nifti(out / "sct.nii.gz")
    assert (sct.modality, sct.units) == ("CT", "HU")
    np.testing.assert_array_equal(sct.array, read_nifti(plain_ct).array)
    record = json.loads((out / "result.json").read_text())
    assert record["measurements"]["method"] == "identity"


def test_run_without_modality_says_how_to_declare_it(
    plain_ct: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _run(str(plain_ct), str(out)) == 2
    err = capsys.readouterr().err
    assert "input_rejected" in err
    assert "cbct-to-sct accepts modalities CT, the input is 'OT'" in err
    assert "--modality CT" in err
    assert not out.exists()


def test_run_refuses_to_relabel(
    mr_nifti: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _run(str(mr_nifti), str(out), "--modality", "CT") == 2
    err = capsys.readouterr().err
    assert "declared modality CT, but the file says it is MR" in err
    assert not out.exists()


def test_run_declares_the_extra_inputs_too(
    plain_ct: Path, mr_nifti: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = [str(plain_ct), str(out), "--reference", str(plain_ct)]
    assert _run(*args, "--modality", "CT") == 0
    m = json.loads((out / "result.json").read_text())["measurements"]
    assert m["body_mask_source"] == "reference CT"
    assert m["metrics"]["sct"]["mae_hu"] == pytest.approx(0.0, abs=1e-6)
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert _run(str(plain_ct), str(refused), "--reference", str(mr_nifti), "--modality", "CT") == 2
    err = capsys.readouterr().err
    assert "input 'reference'" in err
    assert "declared modality CT, but the file says it is MR" in err
    assert not refused.exists()


def test_run_refuses_a_bad_modality_code(
    plain_ct: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(str(plain_ct), str(tmp_path / "out"), "--modality", "C T") == 2
    assert "not a DICOM modality code" in capsys.readouterr().err
