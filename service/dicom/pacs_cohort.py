"""Cohorts defined by a PACS query: find the studies on a node, retrieve them, queue one job each.

:func:`create_pacs_cohort` validates everything up front (pipeline, parameters, priority, node,
destinations, query, retrieve method), writes the cohort row (``fetch_state = "queued"``) and
sends one ``voxelgate.fetch_cohort`` message on the io queue. :func:`fetch_cohort` (the task
body) then runs C-FIND (or QIDO-RS for a DICOMweb-only node), retrieves each study
(:func:`service.dicom.retrieve.retrieve_study`) and queues one job per series of it that the
pipeline accepts, into the cohort. State and counts are kept in ``Cohort.fetch_state`` (queued
-> fetching -> done | failed), ``fetch_error`` and ``fetch_detail`` (``found``, ``retrieved``,
``failed``, ``skipped``, ``jobs``, per-study outcomes by StudyInstanceUID), shown by
``GET /cohorts/{id}``.

A study that fails to retrieve (or has no fitting series) is recorded and skipped; the fetch
fails as a whole only when the query itself fails. Running the task again (a redelivered
message) is harmless: studies already handled are skipped, retrieving again stores duplicates
only, and no second job is created for a series that has one in the cohort.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.errors import VoxelgateError
from models.registry import PipelineSpec, get_spec
from service.dicom import dicomweb, scu
from service.dicom.config import DicomConfig, Node, load_dicom_config
from service.dicom.query import StudyMatch, StudyQuery
from service.dicom.retrieve import resolve_via, retrieve_study
from service.errors import PeerUnreachable
from service.jobs.cohorts import create_cohort_row
from service.jobs.lifecycle import apply_update
from service.jobs.queue import FETCH_COHORT_TASK, Doorbell, send_io_task
from service.jobs.reaper import publish
from service.jobs.submit import add_job, check_priority, validated_params
from service.settings import Settings
from service.store import audit
from service.store.db import session_scope
from service.store.tables import Cohort, Job, Series

log = logging.getLogger(__name__)

FETCH_STATES = ("queued", "fetching", "done", "failed")


def check_destinations(config: DicomConfig, destinations: Sequence[str]) -> list[str]:
    """Return ``destinations`` if each is a configured node, else raise InvalidParameters."""
    for name in destinations:
        config.node(name)
    return list(destinations)


def create_pacs_cohort(
    settings: Settings,
    tenant_id: str,
    node_name: str,
    query: StudyQuery,
    pipeline: str,
    params: dict[str, Any],
    *,
    priority: int = 5,
    destinations: Sequence[str] = (),
    via: str | None = None,
) -> str:
    """Create a PACS-query cohort and send its fetch task.

    Args:
        settings: Service settings.
        tenant_id: Owner.
        node_name: Configured node to query and retrieve from.
        query: Which studies (modality, study date range, further keys).
        pipeline: Registry name of the pipeline each fitting series gets.
        params: Its parameters.
        priority: 0..9 for the jobs.
        destinations: Node names the jobs' DICOM outputs are delivered to.
        via: Retrieve method (default: the node's ``retrieve_via``).

    Returns:
        The cohort id.

    Raises:
        InvalidParameters / UnknownPipeline: Anything invalid; nothing is written then.
    """
    spec = get_spec(pipeline)
    full = validated_params(spec, params)
    check_priority(priority)
    config = load_dicom_config(settings)
    node = config.node(node_name)
    method = resolve_via(node, via)
    targets = check_destinations(config, destinations)
    with session_scope(settings.resolved_database_url) as session:
        cohort = create_cohort_row(session, tenant_id, spec.name, full)
        cohort.source_node = node.name
        cohort.source_query = query.model_dump(mode="json")
        cohort.fetch_state = "queued"
        cohort.fetch_detail = {"via": method, "priority": priority, "destinations": targets}
        cohort_id = cohort.id
    send_io_task(settings, FETCH_COHORT_TASK, cohort_id)
    log.info("pacs cohort %s: node %s, pipeline %s queued", cohort_id, node.name, spec.name)
    return cohort_id


def _claim(settings: Settings, cohort_id: str) -> Cohort | None:
    """Move a queued (or interrupted) fetch to ``fetching``; None when it is not to be run."""
    with session_scope(settings.resolved_database_url) as session:
        claimed = apply_update(
            session,
            update(Cohort)
            .where(Cohort.id == cohort_id, Cohort.fetch_state.in_(("queued", "fetching")))
            .values(fetch_state="fetching"),
        )
        if not claimed:
            return None
        cohort = session.get(Cohort, cohort_id)
        if cohort is not None:
            session.expunge(cohort)
        return cohort


def _save(settings: Settings, cohort_id: str, detail: dict[str, Any], **values: Any) -> None:
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(Cohort).where(Cohort.id == cohort_id).values(fetch_detail=dict(detail), **values)
        )


def _find(settings: Settings, node: Node, query: StudyQuery, via: str) -> list[StudyMatch]:
    if via == "dicomweb" or not node.has_dimse:
        return dicomweb.qido_studies(node, query, timeout_s=settings.dimse_timeout_s)
    return scu.find_studies(node, query, settings)


def _queue_jobs(
    session: Session,
    cohort: Cohort,
    spec: PipelineSpec,
    series_ids: Sequence[str],
    priority: int,
    destinations: Sequence[str],
) -> list[Doorbell]:
    """One job per fitting series of the retrieved study that has none in the cohort yet."""
    accepted = spec.inputs[0].modalities
    rows = session.scalars(select(Series).where(Series.id.in_(list(series_ids)))).all()
    have = set(
        session.scalars(
            select(Job.series_id).where(
                Job.cohort_id == cohort.id, Job.series_id.in_(list(series_ids))
            )
        )
    )
    bells = []
    for series in sorted(rows, key=lambda s: s.id):
        if series.modality not in accepted or series.id in have:
            continue
        job = add_job(
            session,
            cohort.tenant_id,
            series,
            spec,
            dict(cohort.params),
            priority,
            cohort_id=cohort.id,
            destinations=destinations,
        )
        bells.append(Doorbell(job.id, spec.name, priority))
    return bells


def _fetch_one(
    settings: Settings,
    cohort: Cohort,
    spec: PipelineSpec,
    study: StudyMatch,
    detail: dict[str, Any],
) -> dict[str, Any]:
    """Retrieve one study and queue its jobs; returns its outcome entry."""
    via = str(detail.get("via") or "")
    priority = int(detail.get("priority", 5))
    destinations = list(detail.get("destinations") or [])
    try:
        report = retrieve_study(
            settings, cohort.tenant_id, cohort.source_node, study.study_uid, via
        )
    except VoxelgateError as exc:
        return {"state": "failed", "error": str(exc)[:300]}
    with session_scope(settings.resolved_database_url) as session:
        bells = _queue_jobs(session, cohort, spec, report.series_ids, priority, destinations)
        job_ids = [b.job_id for b in bells]
    publish(settings, bells)
    entry: dict[str, Any] = {
        "state": "queued" if job_ids else "skipped",
        "study_id": report.study_ids[0] if report.study_ids else "",
        "instances_stored": report.instances_stored,
        "job_ids": job_ids,
    }
    if not job_ids:
        entry["error"] = f"no series {spec.name} accepts ({', '.join(spec.inputs[0].modalities)})"
    return entry


def _tally(detail: dict[str, Any]) -> None:
    studies = detail.get("studies", {})
    states = [s.get("state") for s in studies.values()]
    detail["retrieved"] = sum(1 for s in states if s in ("queued", "skipped"))
    detail["failed"] = states.count("failed")
    detail["skipped"] = states.count("skipped")
    detail["jobs"] = sum(len(s.get("job_ids", [])) for s in studies.values())


def _retry_later(
    settings: Settings, cohort_id: str, detail: dict[str, Any], exc: PeerUnreachable
) -> str:
    """Schedule another fetch after a backoff (the delivery settings), or give up."""
    attempts = int(detail.get("attempts", 0)) + 1
    detail["attempts"] = attempts
    if attempts >= settings.delivery_max_attempts:
        error = f"{exc} (gave up after {attempts} attempts)"
        _save(settings, cohort_id, detail, fetch_state="failed", fetch_error=error[:1000])
        log.warning("pacs cohort %s: node unreachable, gave up after %d", cohort_id, attempts)
        return "failed"
    delay = min(settings.delivery_backoff_s * 2 ** (attempts - 1), settings.delivery_backoff_max_s)
    error = f"{exc} (attempt {attempts}; next in {delay:.0f} s)"
    _save(settings, cohort_id, detail, fetch_state="queued", fetch_error=error[:1000])
    send_io_task(settings, FETCH_COHORT_TASK, cohort_id, countdown_s=delay)
    log.info("pacs cohort %s: node unreachable, retry %d in %.0f s", cohort_id, attempts, delay)
    return "queued"


def fetch_cohort(settings: Settings, cohort_id: str) -> str | None:
    """Run the fetch of a PACS-query cohort (the body of ``voxelgate.fetch_cohort``).

    A node that does not answer the query is asked again later (``delivery_backoff_s``,
    doubling, up to ``delivery_max_attempts`` runs); any other query error fails the fetch.

    Returns:
        The fetch state it left (``done``, ``failed``, or ``queued`` when a retry is scheduled),
        or None when there was nothing to do (unknown cohort, or its fetch already finished).
    """
    cohort = _claim(settings, cohort_id)
    if cohort is None:
        return None
    detail = dict(cohort.fetch_detail or {})
    try:
        spec = get_spec(cohort.pipeline)
        node = load_dicom_config(settings).node(cohort.source_node)
        query = StudyQuery.model_validate(cohort.source_query)
        found = _find(settings, node, query, str(detail.get("via") or ""))
    except PeerUnreachable as exc:
        return _retry_later(settings, cohort_id, detail, exc)
    except (VoxelgateError, ValueError) as exc:
        _save(settings, cohort_id, detail, fetch_state="failed", fetch_error=str(exc)[:1000])
        log.warning("pacs cohort %s: query failed: %s", cohort_id, exc)
        return "failed"
    studies: dict[str, Any] = dict(detail.get("studies") or {})
    detail.update(found=len(found), studies=studies)
    _save(settings, cohort_id, detail)
    for study in found:
        if studies.get(study.study_uid, {}).get("state") in ("queued", "skipped"):
            continue  # handled by an earlier run of this task
        studies[study.study_uid] = _fetch_one(settings, cohort, spec, study, detail)
        _tally(detail)
        _save(settings, cohort_id, detail)
    _tally(detail)
    _save(settings, cohort_id, detail, fetch_state="done", fetch_error="")
    with session_scope(settings.resolved_database_url) as session:
        audit.record(
            session,
            tenant_id=cohort.tenant_id,
            key_id="",
            action="retrieve",
            resource="cohort",
            resource_id=cohort_id,
            detail={k: detail[k] for k in ("found", "retrieved", "failed", "skipped", "jobs")},
        )
    log.info(
        "pacs cohort %s: %d found, %d retrieved, %d failed, %d jobs",
        cohort_id,
        detail["found"],
        detail["retrieved"],
        detail["failed"],
        detail["jobs"],
    )
    return "done"


def fetch_summary(cohort: Cohort) -> dict[str, Any] | None:
    """The ``fetch`` part of a cohort roll-up (None for a cohort that is no PACS query)."""
    if not cohort.source_node:
        return None
    detail = cohort.fetch_detail or {}
    return {
        "node": cohort.source_node,
        "query": cohort.source_query,
        "state": cohort.fetch_state,
        "error": cohort.fetch_error,
        "via": detail.get("via", ""),
        "found": detail.get("found", 0),
        "retrieved": detail.get("retrieved", 0),
        "failed": detail.get("failed", 0),
        "skipped": detail.get("skipped", 0),
        "jobs": detail.get("jobs", 0),
        "studies": [
            {"study_uid": uid, **{k: v for k, v in entry.items() if k != "job_ids"}}
            for uid, entry in (detail.get("studies") or {}).items()
        ],
    }
