"""``POST /jobs`` and ``POST /cohorts`` with ``"inputs": {"reference": "<series id>"}``.

The app runs in-process on the SQLite store; the test pipeline of
:mod:`tests.unit.two_input_pipeline` is registered per test. Tenant A uploads the real dcmqi
three-slice CT and a derived copy of it (a second CT series of the same study, same grid) as the
reference; a job is run by the worker's own job runner in this process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.io.dicom_derived import write_derived_series
from service.io.dicom_series import DicomSeries
from service.settings import Settings
from service.store.db import session_scope
from service.store.tables import Job
from tests.unit.api_world import (  # noqa: F401
    Caller,
    assert_error,
    client,
    ct_files,
    new_caller,
    settings,
    upload_ct,
    upload_nifti,
)
from tests.unit.two_input_pipeline import NAME, two_input_spec  # noqa: F401
from workers.job_runner import run_job

pytestmark = pytest.mark.usefixtures("two_input_spec")


class Uploads:
    """Tenant A's CT (main input), its reference CT and a NIfTI (modality OT); tenant B."""

    def __init__(self, client: TestClient, settings: Settings, reference: Path) -> None:  # noqa: F811
        self.a = new_caller(settings, "hospital-a")
        self.b = new_caller(settings, "hospital-b")
        study = upload_ct(client, self.a)["studies"][0]
        parts = [
            ("files", (p.name, p.read_bytes(), "application/dicom"))
            for p in sorted(reference.iterdir())
        ]
        response = client.post("/studies", files=parts, headers=self.a.headers)
        assert response.status_code == 201, response.text
        series = client.get(f"/studies/{study['id']}", headers=self.a.headers).json()["series"]
        assert len(series) == 2, "the reference copy joins the study of the CT"
        by_description = {s["description"]: s for s in series}
        self.reference = by_description["reference copy"]
        self.main = next(s for s in series if s is not self.reference)
        self.nifti = upload_nifti(client, self.a)["studies"][0]["series"][0]
        self.b_series = upload_ct(client, self.b)["studies"][0]["series"][0]


@pytest.fixture
def uploads(
    client: TestClient,  # noqa: F811
    settings: Settings,  # noqa: F811
    ct3_series: DicomSeries,
    tmp_path: Path,
) -> Uploads:
    reference = tmp_path / "reference"
    write_derived_series(
        ct3_series.volume,
        ct3_series.template,
        ct3_series.sop_instance_uids,
        str(ct3_series.template.SOPClassUID),
        reference,
        series_description="reference copy",
        derivation_description="test reference",
    )
    return Uploads(client, settings, reference)


def _submit(client: TestClient, caller: Caller, **body: Any) -> Any:  # noqa: F811
    return client.post(
        "/jobs", json={"pipeline": NAME, "params": {}, **body}, headers=caller.headers
    )


def _job_count(settings: Settings) -> int:  # noqa: F811
    with session_scope(settings.resolved_database_url) as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def test_reference_is_stored_run_and_recorded(
    client: TestClient,  # noqa: F811
    settings: Settings,  # noqa: F811
    uploads: Uploads,
) -> None:
    a = uploads.a
    response = _submit(
        client, a, series_id=uploads.main["id"], inputs={"reference": uploads.reference["id"]}
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["series_id"] == uploads.main["id"]
    assert job["inputs"] == {"reference": uploads.reference["id"]}
    assert run_job(settings, job["id"]) == job["id"]
    status = client.get(f"/jobs/{job['id']}", headers=a.headers).json()
    assert status["state"] == "succeeded", status
    assert status["measurements"]["inputs"] == ["image", "reference"]
    assert status["measurements"]["mae_to_reference_hu"] == 0.0
    result = client.get(f"/jobs/{job['id']}/outputs/result.json", headers=a.headers).json()
    assert result["provenance"]["input_uids"] == [
        uploads.main["series_instance_uid"],
        uploads.reference["series_instance_uid"],
    ]
    assert "shifted_dicom.zip" in status["outputs"]


def test_without_inputs_as_before(
    client: TestClient,  # noqa: F811
    settings: Settings,  # noqa: F811
    uploads: Uploads,
) -> None:
    response = _submit(client, uploads.a, series_id=uploads.main["id"])
    assert response.status_code == 201, response.text
    assert response.json()["inputs"] == {}
    assert run_job(settings, response.json()["id"]) == response.json()["id"]
    status = client.get(f"/jobs/{response.json()['id']}", headers=uploads.a.headers).json()
    assert status["state"] == "succeeded", status
    assert status["measurements"] == {"inputs": ["image"]}


@pytest.mark.parametrize(
    ("inputs", "status", "code", "message"),
    [
        (
            {"refrence": "REF"},
            422,
            "invalid_parameters",
            "unknown input 'refrence' (did you mean 'reference'?)",
        ),
        ({"image": "REF"}, 422, "invalid_parameters", "'image' is the main input"),
        ({"reference": "0" * 32}, 404, "not_found", f"input 'reference': series {'0' * 32}"),
        ({"reference": "B"}, 404, "not_found", "input 'reference': series"),
        (
            {"reference": "NIFTI"},
            422,
            "input_rejected",
            f"{NAME} input 'reference' accepts modalities CT; series",
        ),
    ],
)
def test_bad_inputs_are_refused_at_submit(
    client: TestClient,  # noqa: F811
    settings: Settings,  # noqa: F811
    uploads: Uploads,
    inputs: dict[str, str],
    status: int,
    code: str,
    message: str,
) -> None:
    ids = {
        "REF": uploads.reference["id"],
        "B": uploads.b_series["id"],
        "NIFTI": uploads.nifti["id"],
    }
    body = {name: ids.get(value, value) for name, value in inputs.items()}
    before = _job_count(settings)
    error = assert_error(
        _submit(client, uploads.a, series_id=uploads.main["id"], inputs=body), status, code
    )
    assert message in error["message"]
    assert _job_count(settings) == before, "nothing is written for a refused submission"


def test_malformed_inputs_are_request_errors(
    client: TestClient,  # noqa: F811
    uploads: Uploads,
) -> None:
    main = uploads.main["id"]
    for inputs in (["reference"], {"reference": 3}, {"reference": "x" * 33}):
        response = _submit(client, uploads.a, series_id=main, inputs=inputs)
        assert_error(response, 422, "invalid_request")


def test_retry_keeps_the_inputs(
    client: TestClient,  # noqa: F811
    uploads: Uploads,
) -> None:
    a = uploads.a
    inputs = {"reference": uploads.reference["id"]}
    job = _submit(client, a, series_id=uploads.main["id"], inputs=inputs).json()
    assert client.delete(f"/jobs/{job['id']}", headers=a.headers).status_code == 202
    retried = client.post(f"/jobs/{job['id']}/retry", headers=a.headers)
    assert retried.status_code == 201, retried.text
    assert retried.json()["retry_of"] == job["id"]
    assert retried.json()["inputs"] == inputs


def test_cohort_items_carry_their_own_inputs(
    client: TestClient,  # noqa: F811
    settings: Settings,  # noqa: F811
    uploads: Uploads,
) -> None:
    a = uploads.a
    items = [
        {"series_id": uploads.main["id"], "inputs": {"reference": uploads.reference["id"]}},
        {"series_id": uploads.reference["id"]},
    ]
    response = client.post(
        "/cohorts", json={"items": items, "pipeline": NAME, "params": {}}, headers=a.headers
    )
    assert response.status_code == 201, response.text
    cohort_id = response.json()["id"]
    with session_scope(settings.resolved_database_url) as session:
        jobs = session.scalars(select(Job).where(Job.cohort_id == cohort_id)).all()
        got = sorted((j.series_id, j.inputs) for j in jobs)
    assert got == sorted(
        [
            (uploads.main["id"], {"reference": uploads.reference["id"]}),
            (uploads.reference["id"], {}),
        ]
    )
    before = _job_count(settings)
    bad = [*items, {"series_id": uploads.main["id"], "inputs": {"referense": "x"}}]
    refused = client.post(
        "/cohorts", json={"items": bad, "pipeline": NAME, "params": {}}, headers=a.headers
    )
    assert "did you mean 'reference'" in assert_error(refused, 422, "invalid_parameters")["message"]
    assert _job_count(settings) == before, "a cohort with one bad item is refused whole"


def test_pipeline_listing_names_optional_inputs(
    client: TestClient,  # noqa: F811
    uploads: Uploads,
) -> None:
    view = client.get(f"/pipelines/{NAME}", headers=uploads.a.headers).json()
    assert view["inputs"] == [
        {
            "name": "image",
            "modalities": ["CT"],
            "description": "a CT in HU",
            "required": True,
            "main": True,
        },
        {
            "name": "reference",
            "modalities": ["CT"],
            "description": "a CT on the same grid, for evaluation",
            "required": False,
            "main": False,
        },
    ]
