"""retrieve_study against a real Orthanc: C-GET, WADO-RS and C-MOVE (to the real listener)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from service.dicom.retrieve import retrieve_study
from service.errors import InvalidParameters, NotFound
from service.settings import Settings
from service.store.auth import ensure_tenant, find_tenant
from service.store.db import session_scope
from service.store.tables import AuditEvent, Instance, Series, Study
from tests.integration.pacs.conftest import OrthancFactory
from tests.integration.pacs.listener import LISTENER_AE, ScpFactory, config_toml, node
from tests.integration.pacs.orthanc import OrthancPeer, free_port

pytestmark = pytest.mark.integration


def pacs_node(peer: OrthancPeer, via: str) -> dict[str, object]:
    return node(peer.aet, port=peer.dicom_port, dicomweb_url=peer.dicomweb_url, retrieve_via=via)


def configured(settings: Settings, tmp_path: Path, peer: OrthancPeer, via: str) -> Settings:
    path = tmp_path / "dicom.toml"
    path.write_text(config_toml({"ae_title": LISTENER_AE}, {"pacs": pacs_node(peer, via)}))
    return settings.model_copy(update={"dicom_config": path})


def tenant(settings: Settings, name: str = "clinic") -> str:
    with session_scope(settings.resolved_database_url) as session:
        return ensure_tenant(session, name).id


def study_uid_of(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def stored_sop_uids(settings: Settings, tenant_id: str, study_id: str) -> set[str]:
    with session_scope(settings.resolved_database_url) as session:
        return set(
            session.scalars(
                select(Instance.sop_instance_uid)
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Study.id == study_id, Study.tenant_id == tenant_id)
            )
        )


def sop_uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}


@pytest.mark.parametrize("via", ["get", "dicomweb"])
def test_retrieve_get_and_wado(
    via: str,
    orthanc: OrthancPeer,
    sqlite_settings: Settings,
    tmp_path: Path,
    j2k_ct_files: list[Path],
) -> None:
    orthanc.upload(j2k_ct_files)
    settings = configured(sqlite_settings, tmp_path, orthanc, via)
    tenant_id = tenant(settings)
    uid = study_uid_of(j2k_ct_files)

    report = retrieve_study(settings, tenant_id, "pacs", uid)
    assert report.instances_stored == 20
    assert len(report.study_ids) == 1
    assert stored_sop_uids(settings, tenant_id, report.study_ids[0]) == sop_uids(j2k_ct_files)
    with session_scope(settings.resolved_database_url) as session:
        study = session.get(Study, report.study_ids[0])
        assert study is not None
        assert study.study_instance_uid == uid
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "retrieve")).all()
    assert [(e.detail["node"], e.detail["via"], e.detail["instances_stored"]) for e in events] == [
        ("pacs", via, 20)
    ]

    again = retrieve_study(settings, tenant_id, "pacs", uid)  # idempotent
    assert (again.instances_stored, again.instances_duplicate) == (0, 20)
    assert again.study_ids == report.study_ids


def test_retrieve_refusals(orthanc: OrthancPeer, sqlite_settings: Settings, tmp_path: Path) -> None:
    settings = configured(sqlite_settings, tmp_path, orthanc, "get")
    tenant_id = tenant(settings)
    with pytest.raises(NotFound):
        retrieve_study(settings, tenant_id, "pacs", "1.2.3.4.5.6.7.8")
    with pytest.raises(NotFound):
        retrieve_study(settings, tenant_id, "pacs", "1.2.3.4.5.6.7.8", via="dicomweb")
    with pytest.raises(InvalidParameters, match="unknown DICOM node"):
        retrieve_study(settings, tenant_id, "nowhere", "1.2.3")
    with pytest.raises(InvalidParameters, match="UID"):
        retrieve_study(settings, tenant_id, "pacs", "../../etc")
    with pytest.raises(InvalidParameters, match="retrieve method"):
        retrieve_study(settings, tenant_id, "pacs", "1.2.3", via="ftp")
    with session_scope(settings.resolved_database_url) as session:
        assert session.scalars(select(Study)).all() == []


def test_retrieve_by_move_through_the_listener(
    orthanc_factory: OrthancFactory,
    scp_factory: ScpFactory,
    sqlite_settings: Settings,
    tmp_path: Path,
    ct3_dir: Path,
    j2k_ct_files: list[Path],
) -> None:
    peer = orthanc_factory()
    ct3 = sorted(ct3_dir.glob("*.dcm"))
    peer.upload(ct3)
    peer.upload(j2k_ct_files)
    listen_port = free_port()
    scp = scp_factory(
        sqlite_settings,
        nodes={"pacs": pacs_node(peer, "move")},
        port=listen_port,
        tenant="radiology",
        stable_age_s=120,  # the retrieve flushes; the listener's own flusher must not race it
    )
    peer.add_modality("gateway", scp.ae_title, "127.0.0.1", listen_port)
    settings = sqlite_settings.model_copy(update={"dicom_config": scp.config_path})
    with session_scope(settings.resolved_database_url) as session:
        radiology = find_tenant(session, "radiology")
        assert radiology is not None
        tenant_id = radiology.id

    for files in (ct3, j2k_ct_files):
        report = retrieve_study(settings, tenant_id, "pacs", study_uid_of(files))
        assert report.instances_stored == len(files)
        assert stored_sop_uids(settings, tenant_id, report.study_ids[0]) == sop_uids(files)
    assert scp.alive()

    other = tenant(settings, "elsewhere")
    with pytest.raises(InvalidParameters, match="tenant"):
        retrieve_study(settings, other, "pacs", study_uid_of(ct3))


def test_no_patient_identifiers_in_logs_or_audit(
    orthanc: OrthancPeer,
    sqlite_settings: Settings,
    tmp_path: Path,
    ct3_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from service.dicom.config import load_dicom_config
    from service.dicom.query import StudyQuery
    from service.dicom.scu import find_series, find_studies

    files = sorted(ct3_dir.glob("*.dcm"))
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    name, pid = str(header.PatientName), str(header.PatientID)
    assert name
    assert pid
    orthanc.upload(files)
    settings = configured(sqlite_settings, tmp_path, orthanc, "get")
    tenant_id = tenant(settings)
    pacs = load_dicom_config(settings).node("pacs")
    with caplog.at_level(logging.DEBUG):
        found = find_studies(pacs, StudyQuery(keys={"PatientID": pid}), settings)
        assert [s.study_uid for s in found] == [study_uid_of(files)]  # filtered by it ...
        assert pid not in repr(found)  # ... but not echoed back
        find_series(pacs, study_uid_of(files), settings)
        retrieve_study(settings, tenant_id, "pacs", study_uid_of(files))
        retrieve_study(settings, tenant_id, "pacs", study_uid_of(files), via="dicomweb")
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("service")]
    assert ours  # we did log
    assert not [m for m in ours if name in m or pid in m]
    with session_scope(settings.resolved_database_url) as session:
        details = [str(e.detail) for e in session.scalars(select(AuditEvent))]
    assert details
    assert not [d for d in details if name in d or pid in d]
