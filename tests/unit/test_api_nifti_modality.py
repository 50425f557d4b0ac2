"""``POST /studies?nifti_modality=CT``: the declared modality of a NIfTI is stored and applied.

The real TotalSegmentator CT (``example_ct_sm.nii.gz``, a plain NIfTI not written by voxelgate:
it reads as modality ``OT`` without units) is uploaded through the in-process app on the SQLite
store, and a job is run by the worker's own job runner in this process. ``cbct-to-sct`` with
``method=identity`` is the cheapest CT-only pipeline and needs ``units == "HU"``.

* declared CT: stored as CT, read by the worker as CT in HU, the job succeeds;
* undeclared: stored as ``OT`` (as before), CT-only pipelines refuse it at submission;
* a declaration contradicting the file's own (voxelgate) header: refused at upload (422), and a
  stored modality contradicting the file fails the job with the reason.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from service.io.nifti import read_nifti, write_nifti
from service.settings import Settings
from service.store.db import session_scope
from service.store.tables import Series, Study
from tests.unit.api_world import (  # noqa: F401
    NIFTI,
    Caller,
    assert_error,
    client,
    new_caller,
    post_nifti,
    settings,
)
from workers.job_runner import run_job

IDENTITY = {"pipeline": "cbct-to-sct", "params": {"method": "identity"}}


def _run_identity(
    client: TestClient,  # noqa: F811
    settings: Settings,  # noqa: F811
    caller: Caller,
    series_id: str,
) -> dict[str, Any]:
    """Submit ``cbct-to-sct`` identity on a series, run it in this process; its status."""
    response = client.post(
        "/jobs", json={**IDENTITY, "series_id": series_id}, headers=caller.headers
    )
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert run_job(settings, job_id) == job_id
    return dict(client.get(f"/jobs/{job_id}", headers=caller.headers).json())


def _series(response: Any) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    (study,) = response.json()["studies"]
    (series,) = study["series"]
    return dict(series)


def _study_count(settings: Settings) -> int:  # noqa: F811
    with session_scope(settings.resolved_database_url) as session:
        return int(session.scalar(select(func.count()).select_from(Study)) or 0)


@pytest.fixture
def caller(settings: Settings) -> Caller:  # noqa: F811
    return new_caller(settings, "hospital-a")


@pytest.fixture
def plain_ct() -> Path:
    if not NIFTI.exists():
        pytest.skip(f"shared test data not available: {NIFTI}")
    assert read_nifti(NIFTI).modality == "OT", "the example must be a NIfTI without our header"
    return NIFTI


@pytest.fixture
def mr_nifti(plain_ct: Path, tmp_path: Path) -> Path:
    """The same voxels written by voxelgate's writer with modality MR in its header."""
    path = tmp_path / "labelled_mr.nii.gz"
    write_nifti(dataclasses.replace(read_nifti(plain_ct), modality="MR"), path)
    return path


def test_declared_ct_is_stored_and_run_as_hu(
    client: TestClient,  # noqa: F811
    settings: Settings,  # noqa: F811
    caller: Caller,
    plain_ct: Path,
) -> None:
    series = _series(post_nifti(client, caller, plain_ct, "?nifti_modality=CT"))
    assert (series["kind"], series["modality"]) == ("nifti", "CT")
    status = _run_identity(client, settings, caller, series["id"])
    assert status["state"] == "succeeded", status
    job_id = status["id"]
    assert status["measurements"]["method"] == "identity"
    sct = client.get(f"/jobs/{job_id}/outputs/sct.nii.gz", headers=caller.headers)
    assert sct.status_code == 200
    out = Path(settings.data_dir) / "sct.nii.gz"
    out.write_bytes(sct.content)
    volume, source = read_nifti(out), read_nifti(plain_ct)
    assert (volume.modality, volume.units) == ("CT", "HU")
    assert volume.shape == source.shape
    assert float(abs(volume.array - source.array).max()) == 0.0, "identity keeps the HU values"


def test_lower_case_declaration_is_accepted(
    client: TestClient,  # noqa: F811
    caller: Caller,
    plain_ct: Path,
) -> None:
    series = _series(post_nifti(client, caller, plain_ct, "?nifti_modality=ct"))
    assert series["modality"] == "CT"


def test_undeclared_nifti_is_ot_and_ct_pipelines_refuse_it(
    client: TestClient,  # noqa: F811
    caller: Caller,
    plain_ct: Path,
) -> None:
    series = _series(post_nifti(client, caller, plain_ct))
    assert series["modality"] == "OT"
    response = client.post(
        "/jobs", json={**IDENTITY, "series_id": series["id"]}, headers=caller.headers
    )
    error = assert_error(response, 422, "input_rejected")
    assert "OT" in error["message"]


def test_declaring_later_fills_in_the_stored_ot(
    client: TestClient,  # noqa: F811
    caller: Caller,
    plain_ct: Path,
) -> None:
    first = _series(post_nifti(client, caller, plain_ct))
    again = _series(post_nifti(client, caller, plain_ct, "?nifti_modality=CT"))
    assert again["id"] == first["id"]
    assert again["modality"] == "CT"
    undeclared = _series(post_nifti(client, caller, plain_ct))
    assert undeclared["modality"] == "CT", "an undeclared re-upload keeps the declaration"
    refused = post_nifti(client, caller, plain_ct, "?nifti_modality=MR")
    error = assert_error(refused, 422, "input_rejected")
    assert "already stored" in error["message"]
    assert "modality CT, not MR" in error["message"]


def test_declaration_contradicting_the_header_is_refused(
    client: TestClient,  # noqa: F811
    settings: Settings,  # noqa: F811
    caller: Caller,
    mr_nifti: Path,
) -> None:
    before = _study_count(settings)
    error = assert_error(
        post_nifti(client, caller, mr_nifti, "?nifti_modality=CT"), 422, "input_rejected"
    )
    assert "declared nifti_modality CT" in error["message"]
    assert "header says it is MR" in error["message"]
    assert mr_nifti.name in error["message"]
    assert _study_count(settings) == before, "nothing is stored"
    assert _series(post_nifti(client, caller, mr_nifti, "?nifti_modality=MR"))["modality"] == "MR"


def test_invalid_declaration_is_refused_before_the_body(
    client: TestClient,  # noqa: F811
    caller: Caller,
    plain_ct: Path,
) -> None:
    error = assert_error(
        post_nifti(client, caller, plain_ct, "?nifti_modality=C%20T"), 422, "input_rejected"
    )
    assert "not a DICOM modality code" in error["message"]


def test_stored_modality_contradicting_the_file_fails_the_job(
    client: TestClient,  # noqa: F811
    settings: Settings,  # noqa: F811
    caller: Caller,
    mr_nifti: Path,
) -> None:
    """Upload refuses this; a row changed behind its back still cannot relabel the file."""
    series = _series(post_nifti(client, caller, mr_nifti))
    assert series["modality"] == "MR"
    with session_scope(settings.resolved_database_url) as session:
        session.execute(update(Series).where(Series.id == series["id"]).values(modality="CT"))
    status = _run_identity(client, settings, caller, series["id"])
    assert status["state"] == "failed", status
    assert status["error"]["code"] == "input_rejected", status
    assert "declared modality CT, but the file says it is MR" in status["error"]["message"]


def test_upload_documents_the_declaration(client: TestClient) -> None:  # noqa: F811
    upload = client.get("/openapi.json").json()["paths"]["/studies"]["post"]
    (param,) = [p for p in upload["parameters"] if p["name"] == "nifti_modality"]
    assert param["in"] == "query"
    assert "Hounsfield units" in param["description"]
    assert "nifti_modality=CT" in upload["description"]
