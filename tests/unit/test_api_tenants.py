"""Security of the gateway, route by route: keys, tenant isolation, audit log, no patient data in
logs; plus the API surface (pipelines without torch, health, metrics, OpenAPI).

The app runs in-process (``TestClient``) on the default single-machine settings: SQLite job store
and the embedded SQLAlchemy broker. No worker runs, so submitted jobs stay queued; a finished job
with a real output is made by writing the output through the blob store and marking the row.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import update
from starlette.routing import Mount

from service.api.app import create_app
from service.settings import Settings
from service.store.audit import list_events
from service.store.auth import create_api_key, create_tenant, key_id_of, revoke_api_key
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


def upload_nifti(client: TestClient, caller: Caller) -> dict[str, Any]:
    data = require_path(NIFTI).read_bytes()
    response = client.post(
        "/studies",
        files=[("files", (NIFTI.name, data, "application/gzip"))],
        headers=caller.headers,
    )
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


# -- tenant isolation ------------------------------------------------------------------------
def _cross_requests(w: World) -> dict[str, tuple[str, str, dict[str, Any] | None, int]]:
    """name -> (method, url, json body, status tenant A gets for the same request)."""
    job_body = {"pipeline": PIPELINE, "params": PARAMS}
    return {
        "show study": ("GET", f"/studies/{w.study_id}", None, 200),
        "show nifti study": ("GET", f"/studies/{w.nifti_study_id}", None, 200),
        "delete study": ("DELETE", f"/studies/{w.study_id}", None, 204),
        "job on series": ("POST", "/jobs", {**job_body, "series_id": w.series_id}, 201),
        "job on study": ("POST", "/jobs", {**job_body, "study_id": w.study_id}, 201),
        "show job": ("GET", f"/jobs/{w.queued_job}", None, 200),
        "show finished job": ("GET", f"/jobs/{w.done_job}", None, 200),
        "cancel job": ("DELETE", f"/jobs/{w.queued_job}", None, 202),
        "retry job": ("POST", f"/jobs/{w.cancelled_job}/retry", None, 201),
        "download output": ("GET", f"/jobs/{w.done_job}/outputs/{OUTPUT_NAME}", None, 200),
        "cohort on series": (
            "POST",
            "/cohorts",
            {**job_body, "items": [{"series_id": w.series_id}]},
            201,
        ),
        "cohort on study": (
            "POST",
            "/cohorts",
            {**job_body, "items": [{"study_id": w.study_id}]},
            201,
        ),
        "show cohort": ("GET", f"/cohorts/{w.cohort_id}", None, 200),
        "cohort csv": ("GET", f"/cohorts/{w.cohort_id}/results.csv", None, 200),
    }


CROSS_NAMES = [
    "show study",
    "show nifti study",
    "delete study",
    "job on series",
    "job on study",
    "show job",
    "show finished job",
    "cancel job",
    "retry job",
    "download output",
    "cohort on series",
    "cohort on study",
    "show cohort",
    "cohort csv",
]


@pytest.mark.parametrize("name", CROSS_NAMES)
def test_other_tenant_gets_404_and_changes_nothing(
    name: str, client: TestClient, world: World
) -> None:
    method, url, body, a_status = _cross_requests(world)[name]
    before = a_snapshot(client, world)
    b_jobs_before = client.get("/jobs", headers=world.b.headers).json()

    response = client.request(method, url, json=body, headers=world.b.headers)

    assert_error(response, 404, "not_found")
    asked = url + json.dumps(body)
    for secret in (
        world.series_id,
        world.study_id,
        world.done_job,
        world.cohort_id,
        world.queued_job,
        world.nifti_study_id,
    ):
        if secret not in asked:
            assert secret not in response.text, f"404 leaks an id of A: {response.text}"
    assert a_snapshot(client, world) == before, "B's request altered A's resources"
    assert client.get("/jobs", headers=world.b.headers).json() == b_jobs_before

    # The same request by the owner works: the 404 above was isolation, not a bad request.
    response = client.request(method, url, json=body, headers=world.a.headers)
    assert response.status_code == a_status, response.text
    if name == "download output":
        assert response.content == world.output


def test_cohort_mixing_own_and_foreign_series_is_refused_whole(
    client: TestClient, world: World
) -> None:
    body = {
        "items": [{"series_id": world.b_series_id}, {"series_id": world.series_id}],
        "pipeline": PIPELINE,
        "params": PARAMS,
    }
    assert_error(client.post("/cohorts", json=body, headers=world.b.headers), 404, "not_found")
    assert client.get("/jobs", headers=world.b.headers).json() == {"jobs": []}


def test_list_routes_show_only_own_resources(client: TestClient, world: World) -> None:
    b_job = submit(client, world.b, series_id=world.b_series_id)["id"]
    studies = client.get("/studies", headers=world.b.headers).json()["studies"]
    assert [s["id"] for s in studies] == [world.b_study_id]
    assert [s["id"] for s in studies[0]["series"]] == [world.b_series_id]
    # Same StudyInstanceUID as A's study, but B's own row.
    assert world.b_study_id != world.study_id
    for query in ("", "?state=queued", "?state=succeeded", "?state=cancelled"):
        jobs = client.get(f"/jobs{query}", headers=world.b.headers).json()["jobs"]
        assert {j["id"] for j in jobs} <= {b_job}, query
        assert all(j["series_id"] == world.b_series_id for j in jobs)
    a_jobs = {j["id"] for j in client.get("/jobs", headers=world.a.headers).json()["jobs"]}
    assert b_job not in a_jobs
    assert {world.queued_job, world.cancelled_job, world.done_job} <= a_jobs
    a_studies = {s["id"] for s in client.get("/studies", headers=world.a.headers).json()["studies"]}
    assert a_studies == {world.study_id, world.nifti_study_id}


def test_job_view_hides_storage_keys(client: TestClient, world: World) -> None:
    view = client.get(f"/jobs/{world.done_job}", headers=world.a.headers).json()
    assert set(view["outputs"]) == {OUTPUT_NAME}
    assert "key" not in view["outputs"][OUTPUT_NAME]
    assert "jobs/" not in json.dumps(view["outputs"])


def test_deleting_own_study_leaves_other_tenants_copy(client: TestClient, world: World) -> None:
    assert client.delete(f"/studies/{world.study_id}", headers=world.a.headers).status_code == 204
    shown = client.get(f"/studies/{world.b_study_id}", headers=world.b.headers)
    assert shown.status_code == 200
    assert shown.json()["instance_count"] == 3
    submit(client, world.b, series_id=world.b_series_id)


# -- keys ------------------------------------------------------------------------------------
def _walk_routes(routes: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(full path, route) of every leaf route, descending into included routers and mounts.

    FastAPI >= 0.16x keeps included routers as ``_IncludedRouter`` entries of ``app.routes``
    (``original_router`` + ``include_context.prefix``); older versions flatten them.
    """
    for route in routes:
        if isinstance(route, APIRoute):
            yield prefix + route.path, route
        elif getattr(route, "original_router", None) is not None:
            inner_prefix = getattr(getattr(route, "include_context", None), "prefix", "")
            yield from _walk_routes(route.original_router.routes, prefix + inner_prefix)
        elif isinstance(route, Mount):
            yield from _walk_routes(route.routes, prefix + route.path)
        else:
            yield prefix + getattr(route, "path", repr(route)), route


def _api_routes(client: TestClient) -> list[tuple[str, str]]:
    """(method, path) of every API route of the app."""
    routes = []
    for path, route in _walk_routes(client.app.routes):  # type: ignore[attr-defined]
        if isinstance(route, APIRoute):
            routes += [(m, path) for m in sorted(route.methods)]
    return routes


def test_only_documented_routes_exist_besides_api_routes(client: TestClient) -> None:
    others = {
        path
        for path, route in _walk_routes(client.app.routes)  # type: ignore[attr-defined]
        if not isinstance(route, APIRoute)
    }
    assert others <= DOC_ROUTES, f"unexpected non-API routes (check their auth): {others}"
    known = {
        ("POST", "/studies"),
        ("GET", "/studies"),
        ("GET", "/studies/{study_id}"),
        ("DELETE", "/studies/{study_id}"),
        ("POST", "/jobs"),
        ("GET", "/jobs"),
        ("GET", "/jobs/{job_id}"),
        ("DELETE", "/jobs/{job_id}"),
        ("POST", "/jobs/{job_id}/retry"),
        ("GET", "/jobs/{job_id}/outputs/{name}"),
        ("POST", "/cohorts"),
        ("GET", "/cohorts/{cohort_id}"),
        ("GET", "/cohorts/{cohort_id}/results.csv"),
        ("GET", "/pipelines"),
        ("GET", "/pipelines/{name}"),
        ("GET", "/health"),
        ("GET", "/metrics"),
    }
    missing = known - set(_api_routes(client))
    assert not missing, f"route enumeration missed {missing}"


def _fill(path: str, w: World) -> str:
    values = {
        "study_id": w.study_id,
        "job_id": w.done_job,
        "cohort_id": w.cohort_id,
        "name": OUTPUT_NAME,
    }
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: values.get(m[1], "0" * 32), path)


def _bad_credentials(settings: Settings, w: World) -> dict[str, dict[str, str]]:
    revoked = new_caller(settings, "", existing_tenant_id=w.a.tenant_id)
    with session_scope(settings.resolved_database_url) as session:
        revoke_api_key(session, revoked.key_id)
    wrong_secret = f"vg_{w.a.key_id}_{'x' * 43}"
    return {
        "none": {},
        "empty bearer": {"Authorization": "Bearer "},
        "malformed": {"Authorization": "Bearer not-a-key"},
        "unknown key": {"Authorization": f"Bearer vg_{'0' * 16}_{'y' * 43}"},
        "wrong secret": {"Authorization": f"Bearer {wrong_secret}"},
        "wrong secret x-api-key": {"X-API-Key": wrong_secret},
        "revoked": {"Authorization": f"Bearer {revoked.key}"},
        "revoked x-api-key": {"X-API-Key": revoked.key},
        "basic scheme": {"Authorization": f"Basic {w.a.key}"},
    }


def test_every_route_but_health_needs_a_valid_key(
    client: TestClient, settings: Settings, world: World
) -> None:
    routes = _api_routes(client)
    assert ("POST", "/studies") in routes
    assert ("GET", "/jobs/{job_id}/outputs/{name}") in routes
    before = a_snapshot(client, world)
    failures = []
    for label, headers in _bad_credentials(settings, world).items():
        for method, path in routes:
            url = _fill(path, world)
            kwargs: dict[str, Any] = {"headers": headers}
            if (method, path) == ("POST", "/studies"):
                kwargs["files"] = ct_files()
            elif method == "POST" and path in ("/jobs", "/cohorts"):
                kwargs["json"] = {
                    "series_id": world.series_id,
                    "pipeline": PIPELINE,
                    "items": [{"series_id": world.series_id}],
                }
            response = client.request(method, url, **kwargs)
            if (method, path) in PUBLIC_API_ROUTES:
                if response.status_code != 200:
                    failures.append(f"{label}: {method} {path} -> {response.status_code}")
                continue
            body = response.json() if "json" in response.headers.get("content-type", "") else {}
            if (
                response.status_code != 401
                or body.get("error", {}).get("code") != "unauthorized"
                or "bearer" not in response.headers.get("www-authenticate", "").lower()
            ):
                failures.append(
                    f"{label}: {method} {path} -> {response.status_code} {response.text[:120]}"
                )
            assert world.a.key[10:] not in response.text, "the presented secret was echoed"
    assert not failures, "\n".join(failures)
    assert a_snapshot(client, world) == before


def test_both_key_headers_work_and_revocation_takes_effect(
    client: TestClient, settings: Settings, world: World
) -> None:
    second = new_caller(settings, "", existing_tenant_id=world.a.tenant_id)
    for headers in ({"X-API-Key": second.key}, {"Authorization": f"bearer {second.key}"}):
        assert client.get(f"/studies/{world.study_id}", headers=headers).status_code == 200
    with session_scope(settings.resolved_database_url) as session:
        revoke_api_key(session, second.key_id)
    assert_error(client.get("/studies", headers=second.headers), 401, "unauthorized")
    assert client.get("/studies", headers=world.a.headers).status_code == 200


# -- audit log -------------------------------------------------------------------------------
def test_audit_log_records_who_did_what(client: TestClient, settings: Settings) -> None:
    a = new_caller(settings, "hospital-a")
    a2 = new_caller(settings, "", existing_tenant_id=a.tenant_id)
    b = new_caller(settings, "hospital-b")
    study = upload_ct(client, a)["studies"][0]
    job = submit(client, a, series_id=study["series"][0]["id"])["id"]
    assert client.delete(f"/jobs/{job}", headers=a.headers).status_code == 202
    retried = client.post(f"/jobs/{job}/retry", headers=a2.headers)
    assert retried.status_code == 201, retried.text
    retry_id = retried.json()["id"]
    assert retried.json()["retry_of"] == job
    finish_with_output(client, settings, retry_id)
    download = client.get(f"/jobs/{retry_id}/outputs/{OUTPUT_NAME}", headers=a2.headers)
    assert download.status_code == 200
    cohort = client.post(
        "/cohorts",
        json={"items": [{"study_id": study["id"]}], "pipeline": PIPELINE, "params": PARAMS},
        headers=a2.headers,
    )
    assert cohort.status_code == 201, cohort.text
    assert client.delete(f"/studies/{study['id']}", headers=a.headers).status_code == 204
    # B's failed attempts on A's resources are not A's events.
    client.get(f"/jobs/{retry_id}/outputs/{OUTPUT_NAME}", headers=b.headers)
    client.delete(f"/studies/{study['id']}", headers=b.headers)

    with session_scope(settings.resolved_database_url) as session:
        events = [
            (e.action, e.resource, e.resource_id, e.key_id, e.tenant_id)
            for e in reversed(list_events(session, a.tenant_id))
        ]
        b_events = list_events(session, b.tenant_id)
        details = {e.action: e.detail for e in list_events(session, a.tenant_id)}
    expected = [
        ("upload", "study", study["id"], a.key_id, a.tenant_id),
        ("submit", "job", job, a.key_id, a.tenant_id),
        ("cancel", "job", job, a.key_id, a.tenant_id),
        ("retry", "job", retry_id, a2.key_id, a.tenant_id),
        ("download", "job", retry_id, a2.key_id, a.tenant_id),
        ("cohort", "cohort", cohort.json()["id"], a2.key_id, a.tenant_id),
        ("delete", "study", study["id"], a.key_id, a.tenant_id),
    ]
    assert events == expected
    assert details["retry"] == {"retry_of": job}
    assert details["download"] == {"output": OUTPUT_NAME}
    assert details["upload"]["instances_stored"] == 3
    assert b_events == []


# -- no patient data in logs -----------------------------------------------------------------
def _patient_strings() -> set[str]:
    found: set[str] = set()
    for path in sorted(require_path(CT_3SLICE).glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for value in (str(ds.PatientName), str(ds.PatientID)):
            if value.strip():
                found.add(value.strip())
                found.update(p for p in re.split(r"[\^ ]", value) if len(p) >= 3)
    assert found, "the test data has no patient attributes to look for"
    return found


def test_no_patient_name_or_id_in_logs_responses_or_job_store(
    client: TestClient, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    a = new_caller(settings, "hospital-a")
    needles = _patient_strings()
    caplog.set_level(logging.DEBUG)
    uploaded = client.post("/studies", files=ct_files(), headers=a.headers)
    assert uploaded.status_code == 201
    again = upload_ct(client, a)  # duplicates are logged too
    assert again["instances_duplicate"] == 3
    study = uploaded.json()["studies"][0]
    job = submit(client, a, series_id=study["series"][0]["id"])
    shown = client.get(f"/studies/{study['id']}", headers=a.headers)
    texts = [uploaded.text, shown.text, json.dumps(job)]
    assert caplog.records, "nothing was logged: the check would be vacuous"
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(record.exc_text or "")
    for needle in needles:
        leaks = [t[:200] for t in texts if needle in t]
        assert not leaks, f"patient attribute {needle!r} found in: {leaks}"
    database = Path(settings.resolved_database_url.removeprefix("sqlite:///")).read_bytes()
    for needle in needles:
        assert needle.encode() not in database, f"{needle!r} stored in the job store"


# -- API surface -----------------------------------------------------------------------------
def test_pipelines_listed_without_importing_torch(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        from fastapi.testclient import TestClient
        from service.api.app import create_app
        from service.settings import Settings
        from service.store.auth import create_api_key, create_tenant
        from service.store.db import session_scope
        settings = Settings(data_dir=Path({str(tmp_path / "vg-data")!r}))
        with TestClient(create_app(settings, run_reaper=False)) as client:
            with session_scope(settings.resolved_database_url) as session:
                key = create_api_key(session, create_tenant(session, "t").id)
            headers = {{"Authorization": "Bearer " + key}}
            listing = client.get("/pipelines", headers=headers)
            one = client.get("/pipelines/{PIPELINE}", headers=headers)
            missing = client.get("/pipelines/zeroshot-denoize", headers=headers)
        print(json.dumps({{"listing": listing.json(), "one": one.json(),
                           "missing": [missing.status_code, missing.json()],
                           "torch": "torch" in sys.modules}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch"] is False, "listing pipelines imported torch"
    specs = {p["name"]: p for p in result["listing"]["pipelines"]}
    assert PIPELINE in specs
    spec = specs[PIPELINE]
    assert spec["queue"] == "gpu"
    assert "CT" in spec["inputs"][0]["modalities"]
    props = spec["parameters"]["properties"]
    assert props["max_iterations"]["type"] == "integer"
    assert props["max_iterations"]["minimum"] == 10
    assert props["max_iterations"]["maximum"] == 20000
    assert set(props["method"]["enum"]) == {"auto", "slice_split", "pair_split"}
    assert spec["parameters"].get("additionalProperties") is False
    assert result["one"]["name"] == PIPELINE
    assert result["one"]["model_card"].strip()
    assert result["missing"][0] == 404
    assert "zeroshot-denoise" in result["missing"][1]["error"]["message"]


def test_health_needs_no_key(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def _metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    assert match, f"{name}{{{labels}}} missing from /metrics"
    return float(match[1])


def _ingest_total(text: str) -> float:
    match = re.search(r"^voxelgate_ingest_bytes_total (\S+)$", text, re.M)
    assert match, "voxelgate_ingest_bytes_total missing from /metrics"
    return float(match[1])


def test_metrics_expose_jobs_and_queue_depth(client: TestClient, settings: Settings) -> None:
    a = new_caller(settings, "hospital-a")
    before = client.get("/metrics", headers=a.headers)
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain")
    ingest_before = _ingest_total(before.text)
    uploaded = upload_ct(client, a)
    series_id = uploaded["studies"][0]["series"][0]["id"]
    submit(client, a, series_id=series_id)
    cancelled = submit(client, a, series_id=series_id)["id"]
    client.delete(f"/jobs/{cancelled}", headers=a.headers)

    text = client.get("/metrics", headers=a.headers).text
    assert _metric(text, "voxelgate_queue_depth", 'queue="gpu"') == 1.0
    assert _metric(text, "voxelgate_queue_depth", 'queue="cpu"') == 0.0
    assert _metric(text, "voxelgate_jobs", 'state="queued"') == 1.0
    assert _metric(text, "voxelgate_jobs", 'state="cancelled"') == 1.0
    assert _metric(text, "voxelgate_jobs", 'state="succeeded"') == 0.0
    assert "voxelgate_job_duration_seconds" in text
    assert _ingest_total(text) - ingest_before == uploaded["bytes_stored"] > 0


def test_openapi_documents_every_route_with_summary_and_examples(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    for method, path in _api_routes(client):
        operation = doc["paths"].get(path, {}).get(method.lower())
        assert operation is not None, f"{method} {path} missing from OpenAPI"
        assert operation.get("summary", "").strip(), f"{method} {path} has no summary"
    schemas = doc["components"]["schemas"]
    for name in ("JobRequest", "CohortRequest"):
        examples = schemas[name].get("examples")
        assert examples, f"{name} has no examples"
        assert examples[0]["pipeline"] == PIPELINE, name
    job_example = schemas["JobRequest"]["examples"][0]
    assert set(job_example) <= set(schemas["JobRequest"]["properties"])
    upload = doc["paths"]["/studies"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/zip"} <= set(upload)
    assert doc["components"].get("securitySchemes"), "API key schemes are not documented"
