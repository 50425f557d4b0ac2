"""A cohort defined by a PACS query, end to end: real Orthanc, real io and cpu workers.

POST /dicom/nodes/pacs/cohorts (CT, a study date range) -> the io worker runs
``voxelgate.fetch_cohort``: C-FIND, C-GET of each matching study, one zeroshot-denoise job per
CT series -> the cpu worker runs them -> GET /cohorts/{id} shows the fetch and the jobs done.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from service.dicom.pacs_cohort import fetch_cohort
from service.store.db import session_scope
from service.store.tables import Job
from tests.integration.conftest import FAST_PARAMS, Api, WorkerFactory, make_api, wait_until
from tests.integration.pacs.listener import LISTENER_AE, config_toml, node
from tests.integration.pacs.orthanc import OrthancPeer

pytestmark = pytest.mark.integration


@pytest.fixture
def cohort_api(orthanc: OrthancPeer, redis_settings: Any, tmp_path: Path) -> Iterator[Api]:
    path = tmp_path / "dicom.toml"
    nodes = {"pacs": node(orthanc.aet, port=orthanc.dicom_port, retrieve_via="get")}
    path.write_text(config_toml({"ae_title": LISTENER_AE}, nodes))
    settings = redis_settings.model_copy(update={"dicom_config": path})
    yield from make_api(settings)


def test_pacs_query_cohort_end_to_end(
    cohort_api: Api,
    orthanc: OrthancPeer,
    tmp_path: Path,
    ct3_dir: Path,
    j2k_ct_files: list[Path],
    pydicom_file: Any,
) -> None:
    ct3 = sorted(ct3_dir.glob("*.dcm"))
    orthanc.upload(ct3)  # CT, 2003
    orthanc.upload(j2k_ct_files)  # CT, 2022
    orthanc.upload([pydicom_file("MR_small.dcm")])  # MR: not matched by the query
    settings = cohort_api.client.app.state.settings
    workers = WorkerFactory(settings, tmp_path)
    try:
        workers("io1", queues="io")
        workers("cpu1", queues="cpu,gpu")
        answer = cohort_api.post(
            "/dicom/nodes/pacs/cohorts",
            json={
                "query": {"modality": "CT", "study_date": "20000101-20231231"},
                "pipeline": "zeroshot-denoise",
                "params": FAST_PARAMS,
                "priority": 6,
            },
        )
        assert answer.status_code == 201, answer.text
        cohort_id = answer.json()["id"]
        assert answer.json()["fetch"]["state"] in ("queued", "fetching", "done")
        assert answer.json()["done"] is False

        def finished() -> dict[str, Any] | None:
            view = cohort_api.get(f"/cohorts/{cohort_id}").json()
            return view if view["done"] else None

        view = wait_until(finished, 240, "the PACS cohort to finish", period=0.5)
    finally:
        logs = "\n".join(w.log() for w in workers.started)
        for worker in workers.started:
            worker.stop()
    fetch = view["fetch"]
    assert fetch["state"] == "done", (fetch, logs)
    assert (fetch["found"], fetch["retrieved"], fetch["failed"], fetch["jobs"]) == (2, 2, 0, 2)
    assert view["counts"]["succeeded"] == 2, (view, logs)
    uids = {s["study_uid"] for s in fetch["studies"]}
    assert uids == {
        str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        for files in (ct3, j2k_ct_files)
    }
    with session_scope(settings.resolved_database_url) as session:
        jobs = session.query(Job).filter(Job.cohort_id == cohort_id).all()
        assert sorted(j.priority for j in jobs) == [6, 6]

    # A redelivered fetch message does nothing: the fetch is finished.
    assert fetch_cohort(settings, cohort_id) is None
    assert cohort_api.get(f"/cohorts/{cohort_id}").json()["total"] == 2


def test_pacs_cohort_refusals(cohort_api: Api) -> None:
    base = {"query": {"modality": "CT"}, "pipeline": "zeroshot-denoise"}
    assert cohort_api.post("/dicom/nodes/nowhere/cohorts", json=base).status_code == 422
    bad_date = {**base, "query": {"study_date": "last week"}}
    assert cohort_api.post("/dicom/nodes/pacs/cohorts", json=bad_date).status_code == 422
    bad_dest = {**base, "destinations": ["nowhere"]}
    assert cohort_api.post("/dicom/nodes/pacs/cohorts", json=bad_dest).status_code == 422
    bad_pipeline = {**base, "pipeline": "no-such-pipeline"}
    assert cohort_api.post("/dicom/nodes/pacs/cohorts", json=bad_pipeline).status_code == 422
    bad_params = {**base, "params": {"max_iterations": -5}}
    assert cohort_api.post("/dicom/nodes/pacs/cohorts", json=bad_params).status_code == 422


def test_unreachable_node_is_retried_then_failed(sqlite_settings: Any, tmp_path: Path) -> None:
    from service.dicom.pacs_cohort import create_pacs_cohort
    from service.dicom.query import StudyQuery
    from service.store.auth import ensure_tenant
    from service.store.tables import Cohort
    from tests.integration.pacs.orthanc import free_port

    path = tmp_path / "dicom.toml"
    path.write_text(
        config_toml({"ae_title": LISTENER_AE}, {"down": node("DOWN", port=free_port())})
    )
    settings = sqlite_settings.model_copy(
        update={"dicom_config": path, "delivery_max_attempts": 2, "dimse_timeout_s": 5}
    )
    with session_scope(settings.resolved_database_url) as session:
        tenant_id = ensure_tenant(session, "clinic").id
    cohort_id = create_pacs_cohort(
        settings, tenant_id, "down", StudyQuery(modality="CT"), "zeroshot-denoise", {}
    )
    assert fetch_cohort(settings, cohort_id) == "queued"  # retry scheduled
    with session_scope(settings.resolved_database_url) as session:
        cohort = session.get(Cohort, cohort_id)
        assert cohort is not None
        assert "attempt 1" in cohort.fetch_error
    assert fetch_cohort(settings, cohort_id) == "failed"
    with session_scope(settings.resolved_database_url) as session:
        cohort = session.get(Cohort, cohort_id)
        assert cohort is not None
        assert cohort.fetch_state == "failed"
        assert "gave up after 2" in cohort.fetch_error
    assert fetch_cohort(settings, cohort_id) is None
