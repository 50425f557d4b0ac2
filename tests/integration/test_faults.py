"""Fault tests on real parts: kill -9 of a worker mid-job, Redis restart, cancel and retry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .conftest import FAST_PARAMS, SLOW_PARAMS, Api, RedisServer, WorkerFactory, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _running_with_progress(api: Api, job_id: str) -> bool:
    view = api.get(f"/jobs/{job_id}").json()
    return bool(view["state"] == "running" and view["progress_percent"] > 2)


def test_worker_killed_mid_job_completes_exactly_once(
    api: Api, workers: WorkerFactory, ct3_dir: Path, redis_settings: Any
) -> None:
    series_id = api.upload_series(ct3_dir)
    first = workers("w1")
    job_id = api.submit(series_id, {**SLOW_PARAMS, "max_iterations": 600, "min_iterations": 600})
    wait_until(lambda: _running_with_progress(api, job_id), 120, "the job to run")
    first.kill_hard()  # kill -9 of the worker's main process and its pool child
    workers("w2")
    view = api.wait_job(job_id, timeout=300)
    assert view["state"] == "succeeded", view
    assert view["attempts"] == 2
    assert any("worker lost" in m["text"] for m in view["messages"])
    attempts_dir = redis_settings.data_dir / "blobs" / "jobs" / job_id / "attempts"
    assert len([p for p in attempts_dir.iterdir() if not p.name.startswith(".")]) == 1
    assert api.get(f"/jobs/{job_id}/outputs/denoised.nii.gz").status_code == 200


def test_redis_restart_loses_no_job(
    api: Api, workers: WorkerFactory, ct3_dir: Path, redis_server: RedisServer
) -> None:
    series_id = api.upload_series(ct3_dir)
    workers("w1")
    running = api.submit(series_id, {**FAST_PARAMS, "max_iterations": 150, "min_iterations": 150})
    queued = [api.submit(series_id, FAST_PARAMS) for _ in range(2)]
    wait_until(lambda: _running_with_progress(api, running), 120, "the first job to run")
    redis_server.stop()  # no persistence: the queued jobs' messages are gone
    redis_server.start()
    views = [api.wait_job(j, timeout=300) for j in [running, *queued]]
    assert [v["state"] for v in views] == ["succeeded"] * 3, views


def test_cancel_running_then_retry(api: Api, workers: WorkerFactory, ct3_dir: Path) -> None:
    series_id = api.upload_series(ct3_dir)
    workers("w1")
    job_id = api.submit(series_id, SLOW_PARAMS)
    wait_until(lambda: _running_with_progress(api, job_id), 120, "the job to run")
    response = api.delete(f"/jobs/{job_id}")
    assert response.status_code == 202
    assert response.json()["cancel_requested"]
    view = api.wait_job(job_id, timeout=60)
    assert view["state"] == "cancelled"
    assert view["outputs"] == {}
    assert api.delete(f"/jobs/{job_id}").status_code == 409

    retried = api.post(f"/jobs/{job_id}/retry")
    assert retried.status_code == 201, retried.text
    new = retried.json()
    assert new["retry_of"] == job_id
    assert new["params"]["max_iterations"] == SLOW_PARAMS["max_iterations"]
    api.delete(f"/jobs/{new['id']}")  # cancel the (long) retry: queued -> at once, running -> soon
    assert api.wait_job(new["id"], timeout=60)["state"] == "cancelled"
