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


# -- job store fixtures --------------------------------------------------------------------
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379"


@pytest.fixture
def sqlite_settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Settings of a fresh single-machine store (SQLite, blobs under tmp_path), schema upgraded."""
    from service.settings import Settings
    from service.store.db import upgrade_schema

    settings = Settings(data_dir=tmp_path / "vg-data")
    upgrade_schema(settings.resolved_database_url)
    return settings


@pytest.fixture
def postgres_url():  # type: ignore[no-untyped-def]
    """URL of a fresh, empty PostgreSQL database on 127.0.0.1:5432 (dropped afterwards)."""
    import uuid

    sqlalchemy = pytest.importorskip("sqlalchemy")
    admin = sqlalchemy.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"vg_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sqlalchemy.exc.OperationalError as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 not reachable: {exc.orig}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    from service.store.db import engine_for

    engine_for(url).dispose()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_settings(request, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Settings of a fresh store, once on SQLite and once on PostgreSQL; schema upgraded."""
    from service.settings import Settings
    from service.store.db import upgrade_schema

    if request.param == "sqlite":
        settings = Settings(data_dir=tmp_path / "vg-data")
    else:
        url = request.getfixturevalue("postgres_url")
        settings = Settings(data_dir=tmp_path / "vg-data", database_url=url)
    upgrade_schema(settings.resolved_database_url)
    return settings


def seed_series(url: str, tenant_name: str = "clinic", modality: str = "CT") -> tuple[str, str]:
    """Insert a tenant, a study and a DICOM series row; return (tenant id, series id)."""
    from service.store.db import session_scope
    from service.store.tables import Series, Study, Tenant

    with session_scope(url) as s:
        tenant = Tenant(name=tenant_name)
        s.add(tenant)
        s.flush()
        study = Study(tenant_id=tenant.id, study_instance_uid="2.25.1")
        s.add(study)
        s.flush()
        series = Series(
            study_id=study.id, series_instance_uid="2.25.2", kind="dicom", modality=modality
        )
        s.add(series)
        s.flush()
        return tenant.id, series.id
