"""A PACS-query cohort fetched by C-MOVE: real Orthanc -> real ``voxelgate scp`` -> store -> jobs.

The io worker's fetch task C-FINDs Orthanc, C-MOVEs each study to our listener (registered in
Orthanc as a modality), flushes the spooled study into the store without routing, and queues
one zeroshot-denoise job per CT series; the cpu worker runs them. A routing rule matching every
CT must not fire for retrieved studies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service.store.db import session_scope
from service.store.tables import AuditEvent, Job, Study
from tests.integration.conftest import FAST_PARAMS, WorkerFactory, make_api, wait_until
from tests.integration.pacs.conftest import OrthancFactory
from tests.integration.pacs.listener import LISTENER_AE, ScpFactory, config_toml, node
from tests.integration.pacs.orthanc import free_port

pytestmark = pytest.mark.integration


def test_pacs_cohort_by_c_move(
    orthanc_factory: OrthancFactory,
    scp_factory: ScpFactory,
    redis_settings: Any,
    tmp_path: Path,
    ct3_dir: Path,
    j2k_ct_files: list[Path],
) -> None:
    peer = orthanc_factory()
    peer.upload(sorted(ct3_dir.glob("*.dcm")))
    peer.upload(j2k_ct_files)
    port = free_port()
    nodes = {"pacs": node(peer.aet, port=peer.dicom_port, retrieve_via="move")}
    listener = {
        "ae_title": LISTENER_AE,
        "host": "127.0.0.1",
        "port": port,
        "tenant": "hospital-a",
        "stable_age_s": 300,
    }
    path = tmp_path / "dicom.toml"
    # A rule that would queue a job for any CT the listener receives: a retrieve must not fire it.
    rules = [
        {"name": "any-ct", "modality": "CT", "pipeline": "zeroshot-denoise", "params": FAST_PARAMS}
    ]
    path.write_text(config_toml(listener, nodes, rules))
    settings = redis_settings.model_copy(update={"dicom_config": path})
    apis = make_api(settings)
    api = next(apis)  # creates tenant hospital-a with a key
    workers = WorkerFactory(settings, tmp_path)
    try:
        scp = scp_factory(settings, nodes=nodes, port=port, tenant="hospital-a", stable_age_s=300)
        peer.add_modality("voxelgate", scp.ae_title, "127.0.0.1", port)
        workers("io1", queues="io")
        workers("cpu1", queues="cpu,gpu")
        answer = api.post(
            "/dicom/nodes/pacs/cohorts",
            json={
                "query": {"modality": "CT"},
                "pipeline": "zeroshot-denoise",
                "params": FAST_PARAMS,
            },
        )
        assert answer.status_code == 201, answer.text
        cohort_id = answer.json()["id"]

        def finished() -> dict[str, Any] | None:
            view = api.get(f"/cohorts/{cohort_id}").json()
            return view if view["done"] else None

        view = wait_until(finished, 240, "the C-MOVE cohort to finish", period=0.5)
        logs = "\n".join(w.log() for w in workers.started) + scp.log()
        assert scp.alive()
    finally:
        for worker in workers.started:
            worker.stop()
        apis.close()
    fetch = view["fetch"]
    assert fetch["via"] == "move"
    assert (fetch["found"], fetch["retrieved"], fetch["failed"], fetch["jobs"]) == (2, 2, 0, 2), (
        fetch,
        logs,
    )
    assert view["counts"]["succeeded"] == 2, (view, logs)
    with session_scope(settings.resolved_database_url) as session:
        assert len(session.scalars(select(Study)).all()) == 2
        assert len(session.scalars(select(Job)).all()) == 2  # routing did not add any
        actions = [e.action for e in session.scalars(select(AuditEvent))]
    assert "route" not in actions
    assert actions.count("retrieve") >= 2
