"""Deliveries of job DICOM outputs to a real Orthanc: C-STORE (with transcoding) and STOW-RS.

Each attempt runs in-process through :func:`service.delivery.run.run_delivery` (the Celery task
is a thin wrapper of it; ``test_delivery_worker.py`` runs it in a real worker).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from service.delivery import rows
from service.delivery.run import run_delivery
from service.dicom.config import load_dicom_config
from service.jobs.control import get_job, job_view
from service.settings import Settings
from service.store.db import session_scope
from tests.conftest import CT_3SLICE, require_path
from tests.integration.pacs.conftest import OrthancFactory
from tests.integration.pacs.delivery_world import (
    deliver_events,
    delivery,
    finished_job,
    write_config,
)
from tests.integration.pacs.listener import free_port
from tests.integration.pacs.orthanc import OrthancPeer

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _no_broker(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Deliver messages are recorded, not sent: the tests run each attempt themselves."""
    sent: list[str] = []
    monkeypatch.setattr(
        rows, "send_io_task", lambda s, task, arg, countdown_s=None: sent.append(arg)
    )
    return sent


def ct3() -> list[Path]:
    return sorted(require_path(CT_3SLICE).glob("*.dcm"))


def dimse_node(peer: OrthancPeer, **extra: Any) -> dict[str, Any]:
    return {"ae_title": peer.aet, "host": "127.0.0.1", "port": peer.dicom_port, **extra}


def push(
    settings: Settings, tenant_id: str, job_id: str, node: str, force: bool = False
) -> list[str]:
    config = load_dicom_config(settings)
    with session_scope(settings.resolved_database_url) as s:
        job = get_job(s, tenant_id, job_id)
        results, to_publish = rows.push(settings, config, job, s, [node], force=force)
    assert len(results) == 1
    return to_publish


def stored_syntaxes(peer: OrthancPeer) -> set[str]:
    """Transfer syntax of every instance Orthanc stored (metadata ``TransferSyntax``)."""
    return {
        peer.rest("GET", f"/instances/{i}/metadata/TransferSyntax", raw=True).decode()
        for i in peer.instances()
    }


def orthanc_files(peer: OrthancPeer) -> dict[str, Any]:
    """SOPInstanceUID -> dataset of every instance stored in Orthanc (downloaded)."""
    found = {}
    for orthanc_id in peer.instances():
        ds = dcmread(io.BytesIO(peer.rest("GET", f"/instances/{orthanc_id}/file", raw=True)))
        found[str(ds.SOPInstanceUID)] = ds
    return found


def test_cstore_delivery_is_idempotent_unless_forced(
    orthanc: OrthancPeer, sqlite_settings: Settings, tmp_path: Path
) -> None:
    settings = write_config(sqlite_settings, tmp_path / "dicom.toml", {"pacs": dimse_node(orthanc)})
    tenant_id, job_id = finished_job(settings, ct3())
    (delivery_id,) = push(settings, tenant_id, job_id, "pacs")
    assert run_delivery(settings, delivery_id) == "delivered"
    assert run_delivery(settings, delivery_id) is None  # a duplicate message does nothing
    sources = {dcmread(p).SOPInstanceUID: dcmread(p) for p in ct3()}
    stored = orthanc_files(orthanc)
    assert set(stored) == set(sources)
    for uid, ds in stored.items():
        assert np.array_equal(ds.pixel_array, sources[uid].pixel_array)
    row = delivery(settings, job_id, "pacs")
    assert (row.state, row.transport, row.attempts, row.instances_sent) == (
        "delivered",
        "dimse",
        1,
        3,
    )
    assert row.detail["associations"] == 1
    with session_scope(settings.resolved_database_url) as s:
        view = job_view(get_job(s, tenant_id, job_id))["deliveries"]
    assert [(d["node"], d["state"], d["instances_sent"]) for d in view] == [
        ("pacs", "delivered", 3)
    ]
    assert push(settings, tenant_id, job_id, "pacs") == []  # delivered: nothing to do
    (again,) = push(settings, tenant_id, job_id, "pacs", force=True)
    assert again == delivery_id
    assert run_delivery(settings, delivery_id) == "delivered"
    assert len(orthanc.instances()) == 3  # the same instances again, not new ones
    outcomes = [e["outcome"] for e in deliver_events(settings, delivery_id)]
    assert outcomes == ["push_queued", "delivered", "push_unchanged", "push_queued", "delivered"]


def test_jpeg2000_is_decompressed_for_an_implicit_only_orthanc(
    orthanc_factory: OrthancFactory,
    sqlite_settings: Settings,
    tmp_path: Path,
    j2k_ct_files: list[Path],
) -> None:
    peer = orthanc_factory(config={"AcceptedTransferSyntaxes": [ImplicitVRLittleEndian]})
    settings = write_config(sqlite_settings, tmp_path / "dicom.toml", {"pacs": dimse_node(peer)})
    tenant_id, job_id = finished_job(settings, j2k_ct_files)
    assert {dcmread(p).file_meta.TransferSyntaxUID for p in j2k_ct_files} == {JPEG2000Lossless}
    (delivery_id,) = push(settings, tenant_id, job_id, "pacs")
    assert run_delivery(settings, delivery_id) == "delivered"
    row = delivery(settings, job_id, "pacs")
    assert row.instances_sent == len(j2k_ct_files)
    assert row.detail["transcoded"] == {"decompress": len(j2k_ct_files)}
    assert stored_syntaxes(peer) == {ImplicitVRLittleEndian}
    stored = orthanc_files(peer)
    for path in j2k_ct_files:
        source = dcmread(path)
        assert np.array_equal(stored[source.SOPInstanceUID].pixel_array, source.pixel_array)


def test_rle_for_an_orthanc_that_accepts_only_rle(
    orthanc_factory: OrthancFactory, sqlite_settings: Settings, tmp_path: Path
) -> None:
    peer = orthanc_factory(config={"AcceptedTransferSyntaxes": [RLELossless]})
    settings = write_config(sqlite_settings, tmp_path / "dicom.toml", {"pacs": dimse_node(peer)})
    tenant_id, job_id = finished_job(settings, ct3())
    (delivery_id,) = push(settings, tenant_id, job_id, "pacs")
    assert run_delivery(settings, delivery_id) == "delivered"
    assert delivery(settings, job_id, "pacs").detail["transcoded"] == {"compress": 3}
    assert stored_syntaxes(peer) == {RLELossless}
    stored = orthanc_files(peer)
    for path in ct3():
        source = dcmread(path)
        assert np.array_equal(stored[source.SOPInstanceUID].pixel_array, source.pixel_array)


def test_stow_rs_delivery_to_orthanc_dicomweb(
    orthanc: OrthancPeer, sqlite_settings: Settings, tmp_path: Path
) -> None:
    nodes = {
        "web": {
            "dicomweb_url": orthanc.dicomweb_url,
            "send_via": "dicomweb",
            "retrieve_via": "dicomweb",
        }
    }
    settings = write_config(sqlite_settings, tmp_path / "dicom.toml", nodes)
    tenant_id, job_id = finished_job(settings, ct3())
    (delivery_id,) = push(settings, tenant_id, job_id, "web")
    assert run_delivery(settings, delivery_id) == "delivered"
    row = delivery(settings, job_id, "web")
    assert (row.transport, row.instances_sent, row.detail["failed"]) == ("dicomweb", 3, 0)
    assert orthanc.sop_instance_uids() == {dcmread(p).SOPInstanceUID for p in ct3()}


def test_unreachable_nodes_are_retried_then_failed(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    nodes = {
        "down": {"ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()},
        "webdown": {
            "dicomweb_url": f"http://127.0.0.1:{free_port()}/dicom-web",
            "send_via": "dicomweb",
            "retrieve_via": "dicomweb",
        },
    }
    settings = write_config(sqlite_settings, tmp_path / "dicom.toml", nodes).model_copy(
        update={"delivery_max_attempts": 2, "dimse_timeout_s": 5}
    )
    tenant_id, job_id = finished_job(settings, ct3())
    for node in ("down", "webdown"):
        (delivery_id,) = push(settings, tenant_id, job_id, node)
        assert run_delivery(settings, delivery_id) == "pending"
        row = delivery(settings, job_id, node)
        assert row.attempts == 1
        assert row.error
        assert row.next_attempt_at is not None
        with session_scope(settings.resolved_database_url) as s:  # make the retry due now
            s.get(type(row), delivery_id).next_attempt_at = 0.0  # type: ignore[union-attr]
        assert run_delivery(settings, delivery_id) == "failed"
        assert delivery(settings, job_id, node).attempts == 2
        outcomes = [e["outcome"] for e in deliver_events(settings, delivery_id)]
        assert outcomes == ["push_queued", "retry", "failed"]


def test_a_job_without_dicom_outputs_fails_at_once(
    orthanc: OrthancPeer, sqlite_settings: Settings, tmp_path: Path
) -> None:
    settings = write_config(sqlite_settings, tmp_path / "dicom.toml", {"pacs": dimse_node(orthanc)})
    tenant_id, job_id = finished_job(settings, [])
    with session_scope(settings.resolved_database_url) as s:
        get_job(s, tenant_id, job_id).outputs = {}
    (delivery_id,) = push(settings, tenant_id, job_id, "pacs")
    assert run_delivery(settings, delivery_id) == "failed"
    row = delivery(settings, job_id, "pacs")
    assert row.attempts == 1
    assert "no DICOM outputs" in row.error
