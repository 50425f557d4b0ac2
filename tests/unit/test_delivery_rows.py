"""The delivery state machine on SQLite and PostgreSQL: rows, claims, retries, reaper, pushes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from service.delivery import attempts, rows
from service.dicom.config import load_dicom_config
from service.errors import Conflict, InvalidParameters
from service.settings import Settings
from service.store.db import session_scope
from service.store.tables import AuditEvent, Delivery, Job, now
from tests.conftest import seed_series

CONFIG = """
[listener]
ae_title = "VOXELGATE"

[nodes.pacs]
ae_title = "ORTHANC"
port = 4242

[nodes.web]
dicomweb_url = "http://127.0.0.1:1/dicom-web"
send_via = "dicomweb"
retrieve_via = "dicomweb"
"""


@pytest.fixture
def settings(store_settings: Settings, tmp_path: Path) -> Settings:
    path = tmp_path / "dicom.toml"
    path.write_text(CONFIG)
    return store_settings.model_copy(
        update={"dicom_config": path, "delivery_max_attempts": 3, "delivery_backoff_s": 10.0}
    )


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float | None]]:
    """The deliver messages sent (delivery id, countdown), instead of a broker."""
    sent: list[tuple[str, float | None]] = []

    def record(settings: Any, task: str, arg: str, countdown_s: float | None = None) -> None:
        assert task == "voxelgate.deliver"
        sent.append((arg, countdown_s))

    monkeypatch.setattr(rows, "send_io_task", record)
    return sent


def _job(settings: Settings, deliver_to: list[str], state: str = "queued") -> str:
    tenant_id, series_id = seed_series(settings.resolved_database_url, f"clinic-{now()}")
    with session_scope(settings.resolved_database_url) as s:
        job = Job(
            tenant_id=tenant_id,
            series_id=series_id,
            pipeline="zeroshot-denoise",
            pipeline_version="1",
            queue="cpu",
            state=state,
            deliver_to=deliver_to,
            messages=[],
            outputs={},
            measurements={},
            params={},
        )
        s.add(job)
        s.flush()
        rows.add_rows_for_jobs(s, settings, [job.id], deliver_to)
        return job.id


def _finish(settings: Settings, job_id: str, state: str) -> None:
    with session_scope(settings.resolved_database_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(state=state, finished_at=now()))


def _rows(settings: Settings, job_id: str) -> dict[str, dict[str, Any]]:
    with session_scope(settings.resolved_database_url) as s:
        return {
            r.node: {
                "state": r.state,
                "attempts": r.attempts,
                "next": r.next_attempt_at,
                "id": r.id,
            }
            for r in s.scalars(select(Delivery).where(Delivery.job_id == job_id))
        }


def _make_due(settings: Settings, delivery_id: str) -> None:
    with session_scope(settings.resolved_database_url) as s:
        s.execute(update(Delivery).where(Delivery.id == delivery_id).values(next_attempt_at=now()))


def test_backoff_doubles_and_is_capped(settings: Settings) -> None:
    capped = settings.model_copy(update={"delivery_backoff_max_s": 50.0})
    assert [rows.backoff_s(capped, n) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 50, 50]


def test_rows_wait_for_the_job_then_become_pending_and_published(
    settings: Settings, published: list[Any]
) -> None:
    job_id = _job(settings, ["pacs", "web", "gone"])
    before = _rows(settings, job_id)
    assert {n: r["state"] for n, r in before.items()} == {
        "pacs": "waiting",
        "web": "waiting",
        "gone": "failed",  # not a configured node
    }
    assert rows.after_job(settings, load_dicom_config(settings), job_id) == []  # still queued
    _finish(settings, job_id, "succeeded")
    pending = rows.after_job(settings, load_dicom_config(settings), job_id)
    after = _rows(settings, job_id)
    assert sorted(pending) == sorted([after["pacs"]["id"], after["web"]["id"]])
    assert [p[0] for p in published] == pending
    assert after["pacs"]["state"] == after["web"]["state"] == "pending"
    with session_scope(settings.resolved_database_url) as s:
        transports = dict(s.execute(select(Delivery.node, Delivery.transport)).all())
    assert transports == {"pacs": "dimse", "web": "dicomweb", "gone": ""}


def test_a_failed_job_fails_its_deliveries(settings: Settings, published: list[Any]) -> None:
    job_id = _job(settings, ["pacs"])
    _finish(settings, job_id, "failed")
    assert rows.after_job(settings, load_dicom_config(settings), job_id) == []
    assert _rows(settings, job_id)["pacs"]["state"] == "failed"
    assert published == []


def test_claim_once_retry_with_backoff_until_attempts_are_spent(
    settings: Settings, published: list[Any]
) -> None:
    job_id = _job(settings, ["pacs"])
    _finish(settings, job_id, "succeeded")
    (delivery_id,) = rows.after_job(settings, load_dicom_config(settings), job_id)
    held = attempts.claim(settings, delivery_id)
    assert held is not None
    assert held.attempt == 1
    assert attempts.claim(settings, delivery_id) is None  # a duplicate message claims nothing
    t0 = now()
    assert attempts.fail_attempt(settings, held, "dimse", "peer down", retry=True) == "pending"
    row = _rows(settings, job_id)["pacs"]
    assert row["state"] == "pending"
    assert row["attempts"] == 1
    assert 9.0 <= row["next"] - t0 <= 11.0  # first backoff: 10 s
    assert published[-1] == (delivery_id, 10.0)
    assert attempts.claim(settings, delivery_id) is None  # not due yet
    _make_due(settings, delivery_id)
    second = attempts.claim(settings, delivery_id)
    assert second is not None
    assert second.attempt == 2
    assert attempts.fail_attempt(settings, held, "dimse", "stale", retry=True) is None  # lost token
    assert attempts.fail_attempt(settings, second, "dimse", "peer down", retry=True) == "pending"
    assert published[-1] == (delivery_id, 20.0)
    _make_due(settings, delivery_id)
    third = attempts.claim(settings, delivery_id)
    assert third is not None
    assert third.attempt == 3
    assert attempts.fail_attempt(settings, third, "dimse", "peer down", retry=True) == "failed"
    assert _rows(settings, job_id)["pacs"]["state"] == "failed"
    with session_scope(settings.resolved_database_url) as s:
        outcomes = [
            e.detail["outcome"]
            for e in s.scalars(select(AuditEvent).where(AuditEvent.action == "deliver"))
        ]
    assert outcomes == ["retry", "retry", "failed"]


def test_a_permanent_failure_is_not_retried(settings: Settings, published: list[Any]) -> None:
    job_id = _job(settings, ["pacs"])
    _finish(settings, job_id, "succeeded")
    (delivery_id,) = rows.after_job(settings, load_dicom_config(settings), job_id)
    held = attempts.claim(settings, delivery_id)
    assert held is not None
    assert attempts.fail_attempt(settings, held, "dimse", "no outputs", retry=False) == "failed"
    assert len(published) == 1  # only the first publish


def test_delivered_is_idempotent_unless_forced(settings: Settings, published: list[Any]) -> None:
    job_id = _job(settings, ["pacs"])
    _finish(settings, job_id, "succeeded")
    config = load_dicom_config(settings)
    (delivery_id,) = rows.after_job(settings, config, job_id)
    held = attempts.claim(settings, delivery_id)
    assert held is not None
    assert attempts.succeed(settings, held, "dimse", 3, {"associations": 1})
    with session_scope(settings.resolved_database_url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        results, again = rows.push(settings, config, job, s, ["pacs"])
        assert [r.action for r in results] == ["unchanged"]
        assert again == []
        results, again = rows.push(settings, config, job, s, ["pacs"], force=True)
        assert [r.action for r in results] == ["queued"]
        assert again == [delivery_id]
        view = rows.delivery_views(s, job_id)
    assert view[0]["state"] == "pending"
    assert view[0]["attempts"] == 0
    assert view[0]["instances_sent"] == 3  # from the earlier delivery until the next one


def test_push_refuses_unknown_nodes_and_unsuccessful_jobs(
    settings: Settings, published: list[Any]
) -> None:
    job_id = _job(settings, [])
    config = load_dicom_config(settings)
    with session_scope(settings.resolved_database_url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        with pytest.raises(InvalidParameters, match="unknown DICOM node"):
            rows.push(settings, config, job, s, ["nope"])
        results, again = rows.push(settings, config, job, s, ["web"])  # job still queued
        assert [r.action for r in results] == ["waiting"]
        assert again == []
        job.state = "cancelled"
        s.flush()
        with pytest.raises(Conflict):
            rows.push(settings, config, job, s, ["pacs"])


def test_reaper_takes_back_stale_claims_resolves_and_republishes(
    settings: Settings, published: list[Any]
) -> None:
    stale_job = _job(settings, ["pacs"])
    _finish(settings, stale_job, "succeeded")
    (stale_id,) = rows.after_job(settings, load_dicom_config(settings), stale_job)
    held = attempts.claim(settings, stale_id)
    assert held is not None
    cancelled_job = _job(settings, ["pacs"])  # cancelled by a path that skips the runner hook
    _finish(settings, cancelled_job, "cancelled")
    lost_job = _job(settings, ["web"])
    _finish(settings, lost_job, "succeeded")
    (lost_id,) = rows.after_job(settings, load_dicom_config(settings), lost_job)
    with session_scope(settings.resolved_database_url) as s:
        old = now() - attempts.claim_timeout_s(settings) - 1
        s.execute(update(Delivery).where(Delivery.id == stale_id).values(claimed_at=old))
        overdue = now() - attempts.REPUBLISH_GRACE_S - 1
        s.execute(update(Delivery).where(Delivery.id == lost_id).values(next_attempt_at=overdue))
    published.clear()
    again = attempts.reap(settings)
    assert sorted(again) == sorted([stale_id, lost_id])
    assert sorted(p[0] for p in published) == sorted(again)
    assert _rows(settings, stale_job)["pacs"]["state"] == "pending"
    assert _rows(settings, cancelled_job)["pacs"]["state"] == "failed"
    assert attempts.touch(settings, held) is False  # the lost sender finds out
    published.clear()
    assert attempts.reap(settings) == []  # just re-sent: nothing again within the grace period


def test_a_retried_job_keeps_its_destinations(
    settings: Settings, published: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.jobs import control

    monkeypatch.setattr(control, "publish", lambda *_: None)  # no job doorbell needed here
    job_id = _job(settings, ["pacs"])
    _finish(settings, job_id, "failed")
    rows.after_job(settings, load_dicom_config(settings), job_id)
    with session_scope(settings.resolved_database_url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        tenant_id = job.tenant_id
    new_id = control.retry_job(settings, tenant_id, job_id)
    assert _rows(settings, job_id)["pacs"]["state"] == "failed"
    assert _rows(settings, new_id)["pacs"]["state"] == "waiting"
    with session_scope(settings.resolved_database_url) as s:
        retried = s.get(Job, new_id)
        assert retried is not None
        assert retried.deliver_to == ["pacs"]
