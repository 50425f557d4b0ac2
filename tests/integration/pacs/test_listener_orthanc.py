"""A real Orthanc pushes studies into `voxelgate scp` (``POST /modalities/{id}/store``)."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless
from sqlalchemy import select

from service.dicom.spool import dataset_bytes
from service.store.blobs import blob_store
from service.store.db import session_scope
from service.store.tables import AuditEvent, Instance, Job
from tests.conftest import CT_3SLICE, require_path
from tests.integration.pacs.listener import LISTENER_AE, node, store_counts, wait_for

pytestmark = pytest.mark.integration


def test_orthanc_pushes_two_studies_into_the_listener(  # type: ignore[no-untyped-def]
    scp_factory, sqlite_settings, orthanc, j2k_ct_files
) -> None:
    ct3 = sorted(require_path(CT_3SLICE).iterdir())
    rule = {
        "name": "from-pacs",
        "calling_ae": orthanc.aet,
        "modality": "CT",
        "pipeline": "zeroshot-denoise",
    }
    nodes = {"pacs": node(orthanc.aet, orthanc.dicom_port)}
    scp = scp_factory(sqlite_settings, nodes=nodes, rules=[rule], stable_age_s=1.0)
    orthanc.add_modality("voxelgate", LISTENER_AE, "127.0.0.1", scp.port)
    orthanc.upload([*ct3, *j2k_ct_files])
    studies = orthanc.studies()
    assert len(studies) == 2
    answer = orthanc.rest("POST", "/modalities/voxelgate/store", json=studies)
    assert answer is not None
    wait_for(lambda: store_counts(sqlite_settings) == (23, 2), 60, "23 instances and 2 jobs")
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in j2k_ct_files}
    blobs = blob_store(sqlite_settings)
    with session_scope(sqlite_settings.resolved_database_url) as s:
        stored = {i.sop_instance_uid: i.blob_key for i in s.scalars(select(Instance))}
        assert set(sent) <= set(stored)
        jobs = s.scalars(select(Job)).all()
        assert {j.pipeline for j in jobs} == {"zeroshot-denoise"}
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "receive")).all()
        assert {e.detail["calling_ae"] for e in events} == {orthanc.aet}
    for uid, path in sent.items():  # Orthanc sent the J2K instances as it stored them
        kept = blobs.path_of(stored[uid])
        assert pydicom.dcmread(kept, stop_before_pixels=True).file_meta.TransferSyntaxUID == (
            JPEG2000Lossless
        )
        assert dataset_bytes(kept.read_bytes()) == dataset_bytes(path.read_bytes())
