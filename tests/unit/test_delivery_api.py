"""``POST /jobs/{id}/deliveries`` and the job view's ``deliveries`` (in-process app, SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from service.api.app import create_app
from service.settings import Settings
from service.store.auth import create_api_key, create_tenant
from service.store.db import session_scope
from service.store.tables import AuditEvent, Job, now
from tests.conftest import seed_series

CONFIG = """
[nodes.pacs]
ae_title = "ORTHANC"
port = 4242
"""


@pytest.fixture
def world(sqlite_settings: Settings, tmp_path: Path) -> Iterator[tuple[TestClient, Any, str]]:
    config = tmp_path / "dicom.toml"
    config.write_text(CONFIG)
    settings = sqlite_settings.model_copy(update={"dicom_config": config})
    tenant_id, series_id = seed_series(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as s:
        job = Job(
            tenant_id=tenant_id,
            series_id=series_id,
            pipeline="zeroshot-denoise",
            pipeline_version="1",
            queue="cpu",
            state="succeeded",
            finished_at=now(),
            messages=[],
            outputs={},
            measurements={},
            params={},
        )
        s.add(job)
        s.flush()
        job_id = job.id
        key = create_api_key(s, tenant_id)
        other = create_api_key(s, create_tenant(s, "elsewhere").id)
    with TestClient(create_app(settings, run_reaper=False)) as client:
        yield client, {"own": key, "other": other, "settings": settings}, job_id


def _post(client: TestClient, key: str, job_id: str, body: dict[str, Any]) -> Any:
    return client.post(
        f"/jobs/{job_id}/deliveries", json=body, headers={"Authorization": f"Bearer {key}"}
    )


def test_push_queues_once_and_shows_on_the_job(world: Any) -> None:
    client, keys, job_id = world
    first = _post(client, keys["own"], job_id, {"nodes": ["pacs"]})
    assert first.status_code == 202, first.text
    assert [p["action"] for p in first.json()["pushed"]] == ["queued"]
    (shown,) = first.json()["deliveries"]
    assert {k: shown[k] for k in ("node", "transport", "state", "attempts")} == {
        "node": "pacs",
        "transport": "dimse",
        "state": "pending",
        "attempts": 0,
    }
    second = _post(client, keys["own"], job_id, {"nodes": ["pacs"]})
    assert [p["action"] for p in second.json()["pushed"]] == ["unchanged"]  # already pending
    listed = client.get("/jobs", headers={"Authorization": f"Bearer {keys['own']}"}).json()
    assert [d["node"] for d in listed["jobs"][0]["deliveries"]] == ["pacs"]
    with session_scope(keys["settings"].resolved_database_url) as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "deliver")).all()
        assert [e.detail["outcome"] for e in events] == ["push_queued", "push_unchanged"]
        assert all(e.key_id for e in events)


def test_push_refusals(world: Any) -> None:
    client, keys, job_id = world
    assert _post(client, keys["other"], job_id, {"nodes": ["pacs"]}).status_code == 404
    unknown = _post(client, keys["own"], job_id, {"nodes": ["nope"]})
    assert unknown.status_code == 422
    assert "known nodes: pacs" in unknown.json()["error"]["message"]
    assert _post(client, keys["own"], job_id, {"nodes": []}).status_code == 422
    assert _post(client, keys["own"], job_id, {"node": "pacs"}).status_code == 422
    with session_scope(keys["settings"].resolved_database_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(state="failed"))
    assert _post(client, keys["own"], job_id, {"nodes": ["pacs"]}).status_code == 409
