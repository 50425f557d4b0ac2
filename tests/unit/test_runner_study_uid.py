"""Outputs of a source without StudyInstanceUID join the study UID the store derived for it."""

import shutil
from pathlib import Path

import pydicom

from workers.runner import LocalJob, run_local

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "totalsegmentator_ct" / "dicom"
FAST = {"max_iterations": 20, "min_iterations": 10, "crop_size": 48, "features": 8}
DERIVED_UID = "2.25.123456789012345678901234567890"


def test_derived_series_joins_the_derived_study(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    for f in sorted(EXAMPLE.iterdir())[:4]:  # real CT, StudyInstanceUID empty at source
        shutil.copy(f, source / f.name)
    assert not pydicom.dcmread(next(source.iterdir()), stop_before_pixels=True).StudyInstanceUID
    job = LocalJob(
        "zeroshot-denoise",
        source,
        tmp_path / "out",
        FAST,
        allow_missing_study_uid=True,
        study_uid=DERIVED_UID,
    )
    run_local(job, lambda fraction, step: None)
    written = sorted((tmp_path / "out" / "dicom" / "denoised").iterdir())
    uids = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in written}
    assert len(written) == 4
    assert uids == {DERIVED_UID}
