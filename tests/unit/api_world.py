"""The world of the API tests: the app on the default single-machine settings, two tenants' keys,
their uploads and jobs, and helpers to call and inspect the routes.

The app runs in-process (``TestClient``) with the SQLite job store and the embedded SQLAlchemy
broker. No worker runs, so submitted jobs stay queued; a finished job with a real output is
made by writing the output through the blob store and marking the row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import update
from starlette.routing import Mount

from service.api.app import create_app
from service.settings import Settings
from service.store.auth import create_api_key, create_tenant, key_id_of
from service.store.db import session_scope
from service.store.tables import Job, now
from tests.conftest import CT_3SLICE, SHARED_DATA, require_path

REPO = Path(__file__).resolve().parents[2]
NIFTI = SHARED_DATA / "totalsegmentator" / "example_ct_sm.nii.gz"
PIPELINE = "zeroshot-denoise"
# Valid and small; no worker runs in these tests, the values only have to pass validation.
PARAMS = {"max_iterations": 20, "min_iterations": 0, "crop_size": 32, "batch_size": 2}
OUTPUT_NAME = "denoised.nii.gz"
# Routes served without a key: liveness, and FastAPI's own documentation routes.
PUBLIC_API_ROUTES = {("GET", "/health")}
DOC_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


# -- fixtures --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Caller:
    """One tenant's API key."""

    tenant_id: str
    key_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def new_caller(settings: Settings, tenant: str, existing_tenant_id: str | None = None) -> Caller:
    """Create a tenant (or use ``existing_tenant_id``) and an API key of it."""
    with session_scope(settings.resolved_database_url) as session:
        tenant_id = existing_tenant_id or create_tenant(session, tenant).id
        key = create_api_key(session, tenant_id, label=f"test key of {tenant}")
    key_id = key_id_of(key)
    assert key_id is not None
    return Caller(tenant_id, key_id, key)


def ct_files() -> list[tuple[str, tuple[str, bytes, str]]]:
    """The three real CT slices as multipart file parts."""
    folder = require_path(CT_3SLICE)
    return [
        ("files", (p.name, p.read_bytes(), "application/dicom"))
        for p in sorted(folder.glob("*.dcm"))
    ]


def upload_ct(client: TestClient, caller: Caller) -> dict[str, Any]:
    response = client.post("/studies", files=ct_files(), headers=caller.headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


def post_nifti(client: TestClient, caller: Caller, path: Path = NIFTI, query: str = "") -> Any:
    """``POST /studies{query}`` with one NIfTI file; the response, whatever its status."""
    data = require_path(path).read_bytes()
    return client.post(
        f"/studies{query}",
        files=[("files", (path.name, data, "application/gzip"))],
        headers=caller.headers,
    )


def upload_nifti(client: TestClient, caller: Caller) -> dict[str, Any]:
    response = post_nifti(client, caller)
    assert response.status_code == 201, response.text
    return dict(response.json())


def submit(client: TestClient, caller: Caller, **target: str) -> dict[str, Any]:
    body = {**target, "pipeline": PIPELINE, "params": PARAMS, "priority": 5}
    response = client.post("/jobs", json=body, headers=caller.headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


def finish_with_output(client: TestClient, settings: Settings, job_id: str) -> bytes:
    """Mark a job succeeded with one real output file written through the blob store."""
    blobs = client.app.state.blobs  # type: ignore[attr-defined]
    data = require_path(NIFTI).read_bytes()
    folder = blobs.job_outputs_dir(job_id)
    folder.mkdir(parents=True)
    path = folder / OUTPUT_NAME
    path.write_bytes(data)
    outputs = {
        OUTPUT_NAME: {
            "key": blobs.key_of(path),
            "size": len(data),
            "sha256": "0" * 64,
            "media_type": "application/gzip",
        }
    }
    t = now()
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state="succeeded",
                progress=1.0,
                started_at=t - 2.0,
                finished_at=t,
                step="done",
                outputs=outputs,
            )
        )
    return data


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "vg-data")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, run_reaper=False)) as test_client:
        yield test_client


@dataclass
class World:
    """Tenant A with a study, a NIfTI study, jobs in several states and a cohort; tenant B with
    its own upload of the same CT instances."""

    a: Caller
    b: Caller
    study_id: str
    series_id: str
    nifti_study_id: str
    queued_job: str
    cancelled_job: str
    done_job: str
    output: bytes
    cohort_id: str
    b_study_id: str
    b_series_id: str


@pytest.fixture
def world(client: TestClient, settings: Settings) -> World:
    a = new_caller(settings, "hospital-a")
    b = new_caller(settings, "hospital-b")
    study = upload_ct(client, a)["studies"][0]
    nifti = upload_nifti(client, a)["studies"][0]
    series_id = study["series"][0]["id"]
    queued = submit(client, a, series_id=series_id)["id"]
    cancelled = submit(client, a, series_id=series_id)["id"]
    assert client.delete(f"/jobs/{cancelled}", headers=a.headers).status_code == 202
    done = submit(client, a, study_id=study["id"])["id"]
    output = finish_with_output(client, settings, done)
    response = client.post(
        "/cohorts",
        json={"items": [{"series_id": series_id}], "pipeline": PIPELINE, "params": PARAMS},
        headers=a.headers,
    )
    assert response.status_code == 201, response.text
    b_study = upload_ct(client, b)
    assert b_study["instances_stored"] == 3, "B's copy must not count as A's duplicates"
    return World(
        a=a,
        b=b,
        study_id=study["id"],
        series_id=series_id,
        nifti_study_id=nifti["id"],
        queued_job=queued,
        cancelled_job=cancelled,
        done_job=done,
        output=output,
        cohort_id=response.json()["id"],
        b_study_id=b_study["studies"][0]["id"],
        b_series_id=b_study["studies"][0]["series"][0]["id"],
    )


def a_snapshot(client: TestClient, w: World) -> Any:
    """Everything tenant A can see (minus nothing): studies, jobs, the cohort."""
    h = w.a.headers
    return (
        client.get("/studies", headers=h).json(),
        client.get("/jobs", headers=h).json(),
        client.get(f"/cohorts/{w.cohort_id}", headers=h).json(),
        client.get(f"/studies/{w.nifti_study_id}", headers=h).json(),
    )


def assert_error(response: Any, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    return dict(body["error"])


def walk_routes(routes: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(full path, route) of every leaf route, descending into included routers and mounts.

    FastAPI >= 0.16x keeps included routers as ``_IncludedRouter`` entries of ``app.routes``
    (``original_router`` + ``include_context.prefix``); older versions flatten them.
    """
    for route in routes:
        if isinstance(route, APIRoute):
            yield prefix + route.path, route
        elif getattr(route, "original_router", None) is not None:
            inner_prefix = getattr(getattr(route, "include_context", None), "prefix", "")
            yield from walk_routes(route.original_router.routes, prefix + inner_prefix)
        elif isinstance(route, Mount):
            yield from walk_routes(route.routes, prefix + route.path)
        else:
            yield prefix + getattr(route, "path", repr(route)), route


def api_routes(client: TestClient) -> list[tuple[str, str]]:
    """(method, path) of every API route of the app."""
    routes = []
    for path, route in walk_routes(client.app.routes):  # type: ignore[attr-defined]
        if isinstance(route, APIRoute):
            routes += [(m, path) for m in sorted(route.methods)]
    return routes
