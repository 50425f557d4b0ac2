"""The full round trip with real peers and processes, nothing mocked.

dcmtk ``storescu`` sends the real 3-slice CT to ``voxelgate scp`` (helper A's listener) -> after
the stable age the study is stored and a routing rule queues ``zeroshot-denoise`` with
destination Orthanc -> a real Celery worker (queues gpu, cpu, io; Redis broker) runs it -> the
finished job's delivery C-STOREs the derived series to Orthanc -> the series is downloaded from
Orthanc's REST API and re-read: same geometry (affine, shape) as the source, new series UID.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from service.io.dicom_series import load_dicom_series
from service.settings import Settings
from service.store.db import session_scope
from service.store.tables import Job
from tests.conftest import CT_3SLICE, require_path
from tests.integration.conftest import FAST_PARAMS, WorkerFactory, wait_until
from tests.integration.pacs.delivery_world import delivery
from tests.integration.pacs.listener import ScpFactory, node, storescu
from tests.integration.pacs.orthanc import OrthancPeer

pytestmark = pytest.mark.integration


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerFactory]]:
    factories: list[WorkerFactory] = []
    yield factories
    for factory in factories:
        for worker in factory.started:
            worker.stop()


def _routed_job(settings: Settings) -> Job | None:
    with session_scope(settings.resolved_database_url) as s:
        job = s.scalars(select(Job)).first()
        if job is not None:
            s.expunge(job)
        return job


def _job_state(settings: Settings, job_id: str) -> Any:
    with session_scope(settings.resolved_database_url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return (job.state, job.error) if job.state in ("succeeded", "failed", "cancelled") else None


def test_storescu_to_listener_to_worker_to_orthanc(
    redis_settings: Settings,
    tmp_path: Path,
    orthanc: OrthancPeer,
    scp_factory: ScpFactory,
    workers: list[WorkerFactory],
) -> None:
    source_files = sorted(require_path(CT_3SLICE).glob("*.dcm"))
    nodes = {
        "storescu": node("STORESCU"),
        "orthanc": node(orthanc.aet, port=orthanc.dicom_port),
    }
    rules = [
        {
            "name": "ct-denoise",
            "calling_ae": "STORESCU",
            "modality": "CT",
            "pipeline": "zeroshot-denoise",
            "params": FAST_PARAMS,
            "destinations": ["orthanc"],
        }
    ]
    scp = scp_factory(redis_settings, nodes=nodes, rules=rules, stable_age_s=1.0, min_free_bytes=0)
    settings = redis_settings.model_copy(update={"dicom_config": scp.config_path})
    factory = WorkerFactory(settings, tmp_path)
    workers.append(factory)
    worker = factory("roundtrip", queues="gpu,cpu,io")

    sent = storescu(scp.port, source_files)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    job = wait_until(lambda: _routed_job(settings), 60, "the routed job")
    assert (job.pipeline, job.deliver_to) == ("zeroshot-denoise", ["orthanc"])
    state, error = wait_until(lambda: _job_state(settings, job.id), 180, "the job to finish")
    assert state == "succeeded", (error, worker.log())

    def delivered() -> Any:
        row = delivery(settings, job.id, "orthanc")
        return row if row.state in ("delivered", "failed") else None

    row = wait_until(delivered, 60, "the delivery to Orthanc")
    assert row.state == "delivered", (row.error, worker.log())
    assert row.instances_sent == len(source_files)

    # What Orthanc holds, read back through its REST API only.
    (study,) = orthanc.studies()
    (series,) = orthanc.rest("GET", f"/studies/{study}")["Series"]
    instance_ids = orthanc.rest("GET", f"/series/{series}")["Instances"]
    assert len(instance_ids) == len(source_files)
    download = tmp_path / "from-orthanc"
    download.mkdir()
    for n, orthanc_id in enumerate(instance_ids):
        data = orthanc.rest("GET", f"/instances/{orthanc_id}/file", raw=True)
        (download / f"{n:03d}.dcm").write_bytes(data)

    derived = load_dicom_series(download)
    original = load_dicom_series(CT_3SLICE)
    assert derived.volume.array.shape == original.volume.array.shape
    assert np.allclose(derived.volume.affine, original.volume.affine, atol=1e-4)
    first_derived = dcmread(download / "000.dcm", stop_before_pixels=True)
    first_source = dcmread(source_files[0], stop_before_pixels=True)
    assert first_derived.SeriesInstanceUID != first_source.SeriesInstanceUID
    assert first_derived.StudyInstanceUID == first_source.StudyInstanceUID
    assert first_derived.FrameOfReferenceUID == first_source.FrameOfReferenceUID
    assert not np.array_equal(derived.volume.array, original.volume.array)  # denoised

    # No patient identifiers in what the listener and the worker logged on the way.
    logs = worker.log_path.read_text(errors="replace") + scp.log_path.read_text(errors="replace")
    for keyword in ("PatientName", "PatientID"):
        value = str(first_source.get(keyword, "")).strip()
        if len(value) >= 3:
            assert value not in logs, f"{keyword} appears in a log"
