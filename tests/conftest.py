"""Shared fixtures: paths to the real data in ../shared/data, pydicom test files, dcm2niix."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from service.io.dicom_series import DicomSeries, load_dicom_series

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EXAMPLE_CT_DICOM = SHARED_DATA / "totalsegmentator" / "example_ct_dicom"
CT_3SLICE = SHARED_DATA / "dcmqi" / "ct-3slice"


def require_path(path: Path) -> Path:
    """Return ``path`` or skip the test when the shared data is not present."""
    if not path.exists():
        pytest.skip(f"shared test data not available: {path}")
    return path


def pydicom_test_file(name: str) -> Path:
    """Local path of a pydicom / pydicom-data test file; skip if absent (never download)."""
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name, download=False)
    if not found or not Path(str(found)).is_file():
        pytest.skip(f"pydicom test file {name} not available locally")
    return Path(str(found))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_path(SHARED_DATA)


@pytest.fixture(scope="session")
def shared_file(shared_data: Path) -> Callable[[str], Path]:
    """Factory: ``shared_file("cil-head/head.mha")`` -> path under shared/data, or skip."""
    return lambda relative: require_path(shared_data / relative)


@pytest.fixture(scope="session")
def pydicom_file() -> Callable[[str], Path]:
    """Factory: ``pydicom_file("MR_small.dcm")`` -> local pydicom test file, or skip."""
    return pydicom_test_file


@pytest.fixture(scope="session")
def example_ct_dir() -> Path:
    """Real 20-slice CT series, JPEG 2000 lossless, empty StudyInstanceUID."""
    return require_path(EXAMPLE_CT_DICOM)


@pytest.fixture(scope="session")
def ct3_dir() -> Path:
    """Three real CT slices (dcmqi), uncompressed."""
    return require_path(CT_3SLICE)


@pytest.fixture(scope="session")
def dcm2niix() -> str:
    """Path of the dcm2niix executable; skip when it is not installed."""
    exe = shutil.which("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix is not installed: the independent geometry reference is missing")
    return exe


@pytest.fixture(scope="session")
def example_ct_series(example_ct_dir: Path) -> DicomSeries:
    """The real CT series loaded once (opted in to the empty StudyInstanceUID)."""
    return load_dicom_series(example_ct_dir, allow_missing_study_uid=True)


@pytest.fixture(scope="session")
def ct3_series(ct3_dir: Path) -> DicomSeries:
    """The dcmqi three-slice CT loaded once."""
    return load_dicom_series(ct3_dir)
