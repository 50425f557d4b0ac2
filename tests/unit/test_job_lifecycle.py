"""The job state machine in the store, on SQLite and PostgreSQL: claim, ownership, reaper."""

from __future__ import annotations

import time
from typing import Any

import pytest

from models.registry import get_spec
from service.errors import Conflict
from service.jobs import lifecycle, reaper
from service.jobs.control import cancel_job
from service.store.db import session_scope
from service.store.tables import Job
from tests.conftest import seed_series


def _seed(settings: Any, priorities: list[int]) -> list[str]:
    tenant_id, series_id = seed_series(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as s:
        ids = []
        for i, p in enumerate(priorities):
            job = Job(
                tenant_id=tenant_id,
                series_id=series_id,
                pipeline="zeroshot-denoise",
                pipeline_version="1.0.0",
                params={},
                priority=p,
                queue="gpu",
                created_at=time.time() + i * 1e-3,
                messages=[],
                outputs={},
                measurements={},
                broker_epoch="sqla",
                enqueued_at=time.time(),
            )
            s.add(job)
            s.flush()
            ids.append(job.id)
    return ids


def _job(settings: Any, job_id: str) -> Job:
    with session_scope(settings.resolved_database_url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def test_claim_takes_most_urgent_then_oldest(store_settings: Any) -> None:
    ids = _seed(store_settings, [1, 9, 5, 9])
    order = []
    for _ in ids:
        claim = lifecycle.claim(store_settings, ids[0])
        assert claim is not None
        order.append(claim.job_id)
    assert order == [ids[1], ids[3], ids[2], ids[0]]
    assert lifecycle.claim(store_settings, ids[0]) is None  # a duplicate message: nothing to do
    assert all(_job(store_settings, i).state == "running" for i in ids)


def test_only_the_owner_finishes(store_settings: Any) -> None:
    (job_id,) = _seed(store_settings, [5])
    first = lifecycle.claim(store_settings, job_id)
    assert first is not None
    impostor = lifecycle.Claim(**{**first.__dict__, "token": "0" * 32})
    assert not lifecycle.heartbeat(store_settings, impostor).owned
    assert not lifecycle.finish(store_settings, impostor, "succeeded", outputs={"x": {}})
    assert lifecycle.finish(store_settings, first, "succeeded", outputs={"a": {"size": 1}})
    assert not lifecycle.finish(store_settings, first, "failed", error="late")  # already done
    job = _job(store_settings, job_id)
    assert (job.state, job.outputs, job.error) == ("succeeded", {"a": {"size": 1}}, "")


def test_reaper_requeues_a_lost_worker_once_then_fails(store_settings: Any) -> None:
    settings = store_settings.model_copy(update={"heartbeat_timeout_s": 0.2, "max_attempts": 2})
    (job_id,) = _seed(settings, [5])
    sent: list[str] = []
    original = reaper.publish
    reaper.publish = lambda _s, bells, _e=None: sent.extend(b.job_id for b in bells)  # type: ignore[assignment]
    try:
        first = lifecycle.claim(settings, job_id)
        assert first is not None
        time.sleep(0.4)
        report = reaper.reap(settings)
        assert report.requeued == [job_id]
        assert sent == [job_id]
        assert not lifecycle.heartbeat(settings, first).owned  # the lost attempt learns it
        second = lifecycle.claim(settings, job_id)
        assert second is not None
        assert second.attempt == 2
        time.sleep(0.4)
        report = reaper.reap(settings)
        assert report.failed == [job_id]
        assert report.requeued == []
    finally:
        reaper.publish = original  # type: ignore[assignment]
    job = _job(settings, job_id)
    assert job.state == "failed"
    assert job.error_code == "worker_lost"
    assert job.attempts == 2
    assert not lifecycle.finish(settings, second, "succeeded")


def test_reaper_fails_an_attempt_killed_at_the_hard_time_limit(store_settings: Any) -> None:
    settings = store_settings.model_copy(update={"heartbeat_timeout_s": 0.2, "max_attempts": 2})
    (job_id,) = _seed(settings, [5])
    claim = lifecycle.claim(settings, job_id)
    assert claim is not None
    spec = get_spec("zeroshot-denoise")
    with session_scope(settings.resolved_database_url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.started_at = time.time() - spec.time_limit_s - settings.time_limit_grace_s - 1
        job.heartbeat_at = time.time() - 1
    report = reaper.reap(settings)
    assert report.failed == [job_id]
    assert report.requeued == []
    job = _job(settings, job_id)
    assert (job.state, job.error_code, job.attempts) == ("failed", "time_limit", 1)


def test_cancel_queued_at_once_running_cooperatively(store_settings: Any) -> None:
    queued, running = _seed(store_settings, [5, 9])
    claim = lifecycle.claim(store_settings, queued)
    assert claim is not None
    assert claim.job_id == running
    with session_scope(store_settings.resolved_database_url) as s:
        tenant_id = s.get(Job, queued).tenant_id  # type: ignore[union-attr]
        assert cancel_job(s, tenant_id, queued).state == "cancelled"
        assert cancel_job(s, tenant_id, running).state == "running"
    assert lifecycle.heartbeat(store_settings, claim).cancel_requested
    assert lifecycle.finish(store_settings, claim, "cancelled")
    with session_scope(store_settings.resolved_database_url) as s, pytest.raises(Conflict):
        cancel_job(s, tenant_id, running)


def test_reaper_republishes_jobs_of_an_older_broker_epoch(store_settings: Any) -> None:
    ids = _seed(store_settings, [5, 5])
    with session_scope(store_settings.resolved_database_url) as s:
        old = s.get(Job, ids[0])
        assert old is not None
        old.broker_epoch, old.enqueued_at, old.created_at = "lost-epoch", 1.0, 1.0
    sent: list[str] = []
    original = reaper.publish
    reaper.publish = lambda _s, bells, _e=None: sent.extend(b.job_id for b in bells)  # type: ignore[assignment]
    try:
        report = reaper.reap(store_settings)
    finally:
        reaper.publish = original  # type: ignore[assignment]
    assert report.republished == [ids[0]]
    assert sent == [ids[0]]
