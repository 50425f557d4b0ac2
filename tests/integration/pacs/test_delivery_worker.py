"""Deliveries the real way: API push -> Redis -> Celery worker (io queue) -> Orthanc.

The node sits behind a TCP relay on a fixed loopback port, closed at first ("node down") and
opened on Orthanc later ("node up"), so the retry goes to the same address.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from service.settings import Settings
from service.store.auth import create_api_key
from service.store.db import session_scope
from tests.conftest import CT_3SLICE, require_path
from tests.integration.conftest import Api, WorkerFactory, make_api, wait_until
from tests.integration.pacs.delivery_world import Relay, delivery, finished_job, write_config
from tests.integration.pacs.listener import free_port
from tests.integration.pacs.orthanc import OrthancPeer

pytestmark = pytest.mark.integration


@pytest.fixture
def relay() -> Iterator[Relay]:
    r = Relay(free_port())
    yield r
    r.close()


@pytest.fixture
def world(
    redis_settings: Settings, tmp_path: Path, orthanc: OrthancPeer, relay: Relay
) -> Iterator[tuple[Settings, Api, WorkerFactory]]:
    node = {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": relay.port}
    settings = write_config(redis_settings, tmp_path / "dicom.toml", {"pacs": node}).model_copy(
        update={"delivery_backoff_s": 1.0, "delivery_max_attempts": 3, "dimse_timeout_s": 5.0}
    )
    factory = WorkerFactory(settings, tmp_path)
    api_iter = make_api(settings, run_reaper=False)
    api = next(api_iter)
    try:
        yield settings, api, factory
    finally:
        for worker in factory.started:
            worker.stop()
        api_iter.close()


def _job_for(api: Api, settings: Settings) -> str:
    tenant_id, job_id = finished_job(settings, sorted(require_path(CT_3SLICE).glob("*.dcm")))
    with session_scope(settings.resolved_database_url) as s:
        api.key = create_api_key(s, tenant_id)
    return job_id


def _push(api: Api, job_id: str) -> dict[str, Any]:
    response = api.post(f"/jobs/{job_id}/deliveries", json={"nodes": ["pacs"]})
    assert response.status_code == 202, response.text
    return dict(response.json())


def test_node_down_then_up_is_delivered_by_a_retry(
    world: Any, orthanc: OrthancPeer, relay: Relay
) -> None:
    settings, api, workers = world
    job_id = _job_for(api, settings)
    worker = workers("io1", queues="io")
    pushed = _push(api, job_id)
    assert [p["action"] for p in pushed["pushed"]] == ["queued"]

    def failed_once() -> Any:
        row = delivery(settings, job_id, "pacs")
        return row if row.attempts >= 1 and row.state == "pending" else None

    down = wait_until(failed_once, 60, "the first attempt to fail (node down)")
    assert "no association" in down.error
    relay.open(orthanc.dicom_port)

    def delivered() -> Any:
        row = delivery(settings, job_id, "pacs")
        return row if row.state in ("delivered", "failed") else None

    row = wait_until(delivered, 60, "the retry to deliver")
    assert row.state == "delivered", (row.error, worker.log())
    assert row.attempts >= 2
    assert row.instances_sent == 3
    assert orthanc.sop_instance_uids() == {
        dcmread(p).SOPInstanceUID for p in CT_3SLICE.glob("*.dcm")
    }
    view = api.get(f"/jobs/{job_id}").json()
    (shown,) = view["deliveries"]
    assert (shown["node"], shown["state"], shown["transport"]) == ("pacs", "delivered", "dimse")
    again = _push(api, job_id)  # idempotent: nothing queued for a delivered node
    assert [p["action"] for p in again["pushed"]] == ["unchanged"]


def test_spent_attempts_fail_the_delivery(world: Any) -> None:
    settings, api, workers = world
    job_id = _job_for(api, settings)
    workers("io1", queues="io")
    _push(api, job_id)

    def finished() -> Any:
        row = delivery(settings, job_id, "pacs")
        return row if row.state in ("delivered", "failed") else None

    row = wait_until(finished, 90, "the delivery to fail after its attempts")
    assert row.state == "failed"
    assert row.attempts == 3
    assert "no association" in row.error
    assert api.get(f"/jobs/{job_id}").json()["deliveries"][0]["state"] == "failed"
