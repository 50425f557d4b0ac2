"""``voxelgate run ... --input NAME=PATH``: a pipeline's optional second input from the CLI.

Runs the test pipeline of :mod:`tests.unit.two_input_pipeline` (registered per test) on the
real dcmqi three-slice CT, with a derived copy of it (a second series on the same grid) as the
reference; and on the same CT stripped of its rescale tags (not calibrated HU).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from models.errors import InvalidParameters
from service.cli import main, parse_inputs
from service.io.dicom_derived import write_derived_series
from service.io.dicom_series import UNCALIBRATED_CT_NOTE, DicomSeries, load_dicom_series
from tests.unit.two_input_pipeline import NAME, two_input_spec  # noqa: F401

pytestmark = pytest.mark.usefixtures("two_input_spec")


@pytest.fixture
def reference_dir(ct3_series: DicomSeries, tmp_path: Path) -> Path:
    """A second real CT series on the grid of ct-3slice (its derived copy: a new series UID)."""
    out = tmp_path / "reference"
    write_derived_series(
        ct3_series.volume,
        ct3_series.template,
        ct3_series.sop_instance_uids,
        str(ct3_series.template.SOPClassUID),
        out,
        series_description="reference copy",
        derivation_description="test reference",
    )
    return out


@pytest.fixture
def uncalibrated_dir(ct3_dir: Path, tmp_path: Path) -> Path:
    """ct-3slice without RescaleSlope/RescaleIntercept/RescaleType (no HU calibration)."""
    out = tmp_path / "uncalibrated"
    out.mkdir()
    for path in sorted(ct3_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(out / path.name)
    return out


def _run(*args: str) -> int:
    return main(["run", NAME, *args, "-q"])


def test_parse_inputs_and_reference_shorthand() -> None:
    assert parse_inputs(["reference=/a/b", "mask=c.nii.gz"]) == {
        "reference": Path("/a/b"),
        "mask": Path("c.nii.gz"),
    }
    assert parse_inputs([], "/planning") == {"reference": Path("/planning")}
    assert parse_inputs(["x=a=b"]) == {"x": Path("a=b")}  # only the first '=' splits
    for bad in (["reference"], ["=x"], ["reference="]):
        with pytest.raises(InvalidParameters, match="not NAME=PATH"):
            parse_inputs(bad)
    with pytest.raises(InvalidParameters, match="'reference' is given twice"):
        parse_inputs(["reference=/a"], "/b")


def test_reference_is_loaded_and_recorded(
    ct3_dir: Path,
    ct3_series: DicomSeries,
    reference_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    status = _run(str(ct3_dir), str(out), "--input", f"reference={reference_dir}", "-p", "offset=5")
    assert status == 0
    assert json.loads(capsys.readouterr().out)["measurements"]["inputs"] == ["image", "reference"]
    record = json.loads((out / "result.json").read_text())
    assert record["measurements"]["mae_to_reference_hu"] == pytest.approx(5.0)
    reference_uid = load_dicom_series(reference_dir).volume.meta["series_instance_uid"]
    assert record["provenance"]["input_uids"] == [
        ct3_series.volume.meta["series_instance_uid"],
        reference_uid,
    ]
    # the outputs are derived from the main input only
    derived = pydicom.dcmread(next((out / "dicom" / "shifted").iterdir()))
    assert (
        derived.ReferencedSeriesSequence[0].SeriesInstanceUID
        == ct3_series.template.SeriesInstanceUID
    )


def test_reference_shorthand_and_no_reference(
    ct3_dir: Path,
    reference_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _run(str(ct3_dir), str(tmp_path / "a"), "--reference", str(reference_dir)) == 0
    assert json.loads(capsys.readouterr().out)["measurements"]["mae_to_reference_hu"] == 0.0
    assert _run(str(ct3_dir), str(tmp_path / "b")) == 0  # the reference is optional
    assert json.loads(capsys.readouterr().out)["measurements"] == {"inputs": ["image"]}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("refrence", "unknown input 'refrence' (did you mean 'reference'?)"),
        (
            "planning",
            "unknown input 'planning'; it takes image (CT, main), reference (CT, optional)",
        ),
        ("image", "'image' is the main input"),
    ],
)
def test_bad_input_names_fail_before_reading(
    name: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    missing = tmp_path / "nothing"  # never read: the names are checked first
    status = _run(str(missing), str(tmp_path / "o"), "--input", f"{name}={missing}")
    assert status == 2
    err = capsys.readouterr().err
    assert "invalid_parameters" in err
    assert message in err
    assert not (tmp_path / "o").exists()


def test_reference_of_another_modality_is_refused(
    ct3_dir: Path,
    shared_file: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    nifti = shared_file("totalsegmentator/example_ct_sm.nii.gz")  # plain NIfTI: modality OT
    assert _run(str(ct3_dir), str(tmp_path / "o"), "--reference", str(nifti)) == 2
    err = capsys.readouterr().err
    assert f"{NAME} input 'reference' accepts modalities CT; {nifti} is OT" in err
    assert not (tmp_path / "o").exists()


def test_unreadable_reference_names_the_input(
    ct3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(str(ct3_dir), str(tmp_path / "o"), "--reference", str(tmp_path / "gone")) == 2
    assert "input 'reference': " in capsys.readouterr().err


def test_uncalibrated_ct_is_not_hu_and_the_refusal_says_why(
    uncalibrated_dir: Path,
    reference_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    volume = load_dicom_series(uncalibrated_dir).volume
    assert (volume.modality, volume.units) == ("CT", "")
    assert volume.meta["hu_calibrated"] is False
    assert volume.meta["units_note"] == UNCALIBRATED_CT_NOTE
    status = _run(str(uncalibrated_dir), str(tmp_path / "o"), "--reference", str(reference_dir))
    assert status == 2
    err = capsys.readouterr().err
    assert "input_rejected" in err
    assert f"{NAME} needs the image in HU" in err
    assert f"input 'image': {UNCALIBRATED_CT_NOTE}" in err
    assert "no Rescale Slope/Intercept" in err
    assert "not calibrated HU" in err
