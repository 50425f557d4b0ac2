"""Pull one study from a configured node into the store: C-GET, C-MOVE or WADO-RS.

* ``get``: C-GET into a staging folder, then ``ingest_files(source="pacs")``.
* ``dicomweb``: WADO-RS into a staging folder, then the same.
* ``move``: C-MOVE to our listener's AE title (the node must know it as a modality); the
  listener (``voxelgate scp``, same ``data_dir``) spools the instances and we ingest them at
  once with :func:`service.dicom.stable.flush_study` (``route=False``: a retrieved study does
  not trigger routing rules). The instances land in the listener's tenant, so a move is only
  possible for that tenant.

Every retrieve is all-or-nothing from the caller's view: when the peer reports failed
sub-operations, nothing is ingested by ``get``/``dicomweb`` and :class:`PeerFailed` is raised
(a ``move`` cannot take back what the listener spooled; those instances are stored without
routing and the error says so). Audited as ``retrieve`` (node, method, counts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy import select

from service.dicom import dicomweb, scu
from service.dicom.config import DicomConfig, Node, load_dicom_config
from service.dicom.query import StudyQuery, check_uid
from service.errors import InvalidParameters, NotFound, PeerFailed
from service.settings import Settings
from service.store import audit
from service.store.auth import find_tenant
from service.store.blobs import blob_store
from service.store.db import session_scope
from service.store.studies import IngestReport, ingest_files
from service.store.tables import Study

log = logging.getLogger(__name__)
MOVE_MARKER_TTL_S = 3600.0
"""How long the listener leaves a study that our C-MOVE is bringing to the retrieve (s)."""

Via = Literal["move", "get", "dicomweb"]
VIAS: tuple[Via, ...] = ("move", "get", "dicomweb")


@dataclass(frozen=True)
class _Fetched:
    """Counts of one transfer (before ingest)."""

    received: int
    failed: int


def resolve_via(node: Node, via: str | None) -> Via:
    """The retrieve method: ``via`` if given, else the node's ``retrieve_via``; checked.

    Raises:
        InvalidParameters: Unknown method, or the node lacks the service it needs.
    """
    chosen = via or node.retrieve_via
    if chosen not in VIAS:
        raise InvalidParameters(f"retrieve method must be one of {', '.join(VIAS)}: {chosen!r}")
    if chosen == "dicomweb" and not node.dicomweb_url:
        raise InvalidParameters(f"DICOM node {node.name!r} has no dicomweb_url for WADO-RS")
    if chosen in ("move", "get") and not node.has_dimse:
        raise InvalidParameters(f"DICOM node {node.name!r} has no DIMSE service for C-{chosen}")
    return chosen


def _fetch_into(
    settings: Settings, node: Node, via: Via, study_uid: str, staging: Path
) -> tuple[list[Path], _Fetched]:
    if via == "get":
        outcome = scu.get_study(node, study_uid, staging, settings)
        return outcome.files, _Fetched(len(outcome.files), outcome.failed)
    files = dicomweb.wado_study(node, study_uid, staging, timeout_s=settings.dimse_timeout_s)
    return files, _Fetched(len(files), 0)


def _record(
    settings: Settings,
    tenant_id: str,
    study_id: str,
    node: Node,
    via: Via,
    report: IngestReport,
    key_id: str,
) -> None:
    with session_scope(settings.resolved_database_url) as session:
        audit.record(
            session,
            tenant_id=tenant_id,
            key_id=key_id,
            action="retrieve",
            resource="study",
            resource_id=study_id,
            detail={
                "node": node.name,
                "via": via,
                "instances_stored": report.instances_stored,
                "instances_duplicate": report.instances_duplicate,
            },
        )


def _staged_retrieve(
    settings: Settings, tenant_id: str, node: Node, via: Via, study_uid: str
) -> IngestReport:
    blobs = blob_store(settings)
    with blobs.staging_area() as staging:
        files, fetched = _fetch_into(settings, node, via, study_uid, staging)
        if fetched.failed:
            raise PeerFailed(
                f"DICOM node {node.name!r}: {fetched.failed} instance(s) of study {study_uid} "
                f"failed to transfer ({fetched.received} received); nothing stored"
            )
        if not files:
            raise NotFound(f"DICOM node {node.name!r} has no instances of study {study_uid}")
        with session_scope(settings.resolved_database_url) as session:
            return ingest_files(session, blobs, tenant_id, files, settings, source="pacs")


def _require_on_node(settings: Settings, node: Node, study_uid: str) -> None:
    """Raise NotFound unless a C-FIND on ``node`` finds the study."""
    if not scu.find_studies(node, StudyQuery(study_uid=study_uid, limit=1), settings):
        raise NotFound(f"DICOM node {node.name!r} has no study {study_uid}")


def _listener_tenant_id(settings: Settings, config: DicomConfig) -> str | None:
    with session_scope(settings.resolved_database_url) as session:
        tenant = find_tenant(session, config.listener.tenant)
        return tenant.id if tenant is not None else None


def _stored_study_report(settings: Settings, tenant_id: str, study_uid: str) -> IngestReport:
    """A report for a study already in the store (the listener's own flush was first)."""
    with session_scope(settings.resolved_database_url) as session:
        study_id = session.scalars(
            select(Study.id).where(
                Study.tenant_id == tenant_id,
                Study.study_instance_uid == study_uid,
                Study.deleted_at.is_(None),
            )
        ).first()
    if study_id is None:
        raise NotFound(f"study {study_uid} was moved but did not reach the store")
    return IngestReport(
        study_ids=[study_id], instances_stored=0, instances_duplicate=0, bytes_stored=0
    )


def _moved_retrieve(
    settings: Settings, config: DicomConfig, tenant_id: str, node: Node, study_uid: str
) -> IngestReport:
    from service.dicom.spool import spool_for, study_key  # the listener side
    from service.dicom.stable import flush_study

    if _listener_tenant_id(settings, config) != tenant_id:
        raise InvalidParameters(
            f"C-MOVE delivers to the listener, whose instances belong to tenant "
            f"{config.listener.tenant!r}; use retrieve method 'get' or 'dicomweb' instead"
        )
    spool = spool_for(settings)
    # The listener's flusher leaves the study to us (and never routes it) while the move runs.
    spool.expect(tenant_id, study_uid, ttl_s=MOVE_MARKER_TTL_S)
    try:
        outcome = scu.move_study(node, study_uid, config.listener.ae_title, settings)
        flushed = flush_study(settings, tenant_id, study_uid, route=False)
    finally:
        spool.unexpect(tenant_id, study_key(tenant_id, study_uid))
    if flushed is None:
        if outcome.completed == 0:
            raise NotFound(f"DICOM node {node.name!r} has no instances of study {study_uid}")
        report = _stored_study_report(settings, tenant_id, study_uid)
    else:
        report = flushed.report
    if outcome.failed:
        raise PeerFailed(
            f"DICOM node {node.name!r}: {outcome.failed} instance(s) of study {study_uid} "
            f"failed to move; {outcome.completed} arrived and were stored without routing"
        )
    return report


def retrieve_study(
    settings: Settings,
    tenant_id: str,
    node_name: str,
    study_uid: str,
    via: str | None = None,
    *,
    key_id: str = "",
) -> IngestReport:
    """Pull a study from a configured node into the tenant's store.

    Args:
        settings: Service settings.
        tenant_id: Owner of the retrieved study.
        node_name: A configured node.
        study_uid: StudyInstanceUID on the node.
        via: ``move``, ``get`` or ``dicomweb``; default the node's ``retrieve_via``.
        key_id: API key id for the audit event (``""``: system or CLI).

    Returns:
        The ingest report (re-retrieving a stored study counts duplicates only).

    Raises:
        InvalidParameters: Unknown node, bad UID, or a method the node (or tenant) cannot use.
        NotFound: The node has no instances of the study.
        PeerFailed: The node refused, or some instances failed to transfer.
        PeerUnreachable: The node did not answer (transient).
        InputRejected: The store refused the received files.
    """
    try:
        check_uid(study_uid)
    except ValueError as exc:
        raise InvalidParameters(str(exc)) from exc
    config = load_dicom_config(settings)
    node = config.node(node_name)
    method = resolve_via(node, via)
    if method in ("move", "get"):
        _require_on_node(settings, node, study_uid)  # C-GET/C-MOVE only say "unable to process"
    if method == "move":
        report = _moved_retrieve(settings, config, tenant_id, node, study_uid)
    else:
        report = _staged_retrieve(settings, tenant_id, node, method, study_uid)
    for study_id in report.study_ids:
        _record(settings, tenant_id, study_id, node, method, report, key_id)
    log.info(
        "retrieve: node %s via %s: study %s, %d stored, %d duplicate",
        node.name,
        method,
        study_uid,
        report.instances_stored,
        report.instances_duplicate,
    )
    return report
