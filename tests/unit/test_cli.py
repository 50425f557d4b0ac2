"""The CLI end to end on the bundled real CT example (small fitting budget to stay fast)."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from service.cli import main
from service.io.dicom_series import load_dicom_series

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "totalsegmentator_ct" / "dicom"
FAST = ["-p", "max_iterations=30", "-p", "crop_size=64", "-p", "features=16", "-q"]


@pytest.fixture(scope="module")
def small_series(tmp_path_factory) -> Path:
    """Six slices of the bundled example (a whole series, fewer slices: faster)."""
    folder = tmp_path_factory.mktemp("series")
    for f in sorted(EXAMPLE.iterdir())[:6]:
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def run_output(small_series, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    status = main(
        ["run", "zeroshot-denoise", str(small_series), str(out), "--allow-missing-study-uid", *FAST]
    )
    assert status == 0
    return out


def test_outputs_are_complete_and_listed(run_output):
    record = json.loads((run_output / "result.json").read_text())
    files = set(record["files"])
    assert {"denoised.nii.gz", "before_after.png"} <= files
    assert sum(f.startswith("dicom/denoised/") for f in files) == 6
    prov = record["provenance"]
    assert prov["pipeline"] == "zeroshot-denoise"
    assert prov["weights_sha256"] == "none"
    assert prov["parameters"]["max_iterations"] == 30
    assert record["measurements"]["noise_std_after"] < record["measurements"]["noise_std_before"]
    png = np.asarray(Image.open(run_output / "before_after.png"))
    assert png.shape == (3 * 512, 3 * 512, 3)


def test_derived_series_keeps_geometry(run_output, small_series):
    source = load_dicom_series(small_series, allow_missing_study_uid=True).volume
    derived = load_dicom_series(run_output / "dicom" / "denoised").volume
    np.testing.assert_allclose(derived.affine, source.affine, atol=1e-4)
    assert derived.frame_of_reference_uid == source.frame_of_reference_uid
    nifti = nib.load(run_output / "denoised.nii.gz")
    assert nifti.shape == (512, 512, 6)
    # the derived DICOM and the NIfTI hold the same HU (within the DICOM rescale quantum)
    from service.io.nifti import read_nifti

    np.testing.assert_allclose(
        read_nifti(run_output / "denoised.nii.gz").array, derived.array, atol=0.05
    )


def test_missing_study_uid_is_refused_without_opt_in(small_series, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "zeroshot-denoise", str(small_series), str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "StudyInstanceUID is empty" in err
    assert "--allow-missing-study-uid" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "zeroshot-denoize", "IN", "OUT"], "unknown pipeline"),
        (["run", "zeroshot-denoise", "IN", "OUT", "-p", "iterations=5"], "unknown parameter"),
        (["run", "zeroshot-denoise", "IN", "OUT", "-p", "features=2"], "features"),
        (["run", "zeroshot-denoise", "IN", "OUT", "-p", "oops"], "not key=value"),
    ],
)
def test_bad_requests_fail_before_reading(args, message, tmp_path, capsys):
    args = [
        a.replace("IN", str(tmp_path / "nothing")).replace("OUT", str(tmp_path / "o")) for a in args
    ]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_non_dicom_input_names_the_file(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    assert main(["run", "zeroshot-denoise", str(bad), str(tmp_path / "o"), *FAST]) == 2
    assert "notes.txt" in capsys.readouterr().err


def test_failed_run_leaves_previous_output_untouched(run_output, tmp_path, capsys):
    before = (run_output / "result.json").read_bytes()
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    assert main(["run", "zeroshot-denoise", str(bad), str(run_output), *FAST]) == 2
    assert (run_output / "result.json").read_bytes() == before
