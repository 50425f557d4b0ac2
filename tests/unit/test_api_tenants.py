"""Security of the gateway, route by route: keys, tenant isolation, audit log, no patient data in
logs (the world they run in: ``api_world.py``)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from service.settings import Settings
from service.store.audit import list_events
from service.store.auth import revoke_api_key
from service.store.db import session_scope
from tests.conftest import CT_3SLICE, require_path
from tests.unit.api_world import (
    DOC_ROUTES,
    OUTPUT_NAME,
    PARAMS,
    PIPELINE,
    PUBLIC_API_ROUTES,
    World,
    a_snapshot,
    api_routes,
    assert_error,
    ct_files,
    finish_with_output,
    new_caller,
    submit,
    upload_ct,
    walk_routes,
)


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
def test_only_documented_routes_exist_besidesapi_routes(client: TestClient) -> None:
    others = {
        path
        for path, route in walk_routes(client.app.routes)  # type: ignore[attr-defined]
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
    missing = known - set(api_routes(client))
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
    routes = api_routes(client)
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
