"""Cancel and retry, and the JSON view of a job."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, object_session

from models.registry import get_spec
from service.delivery.rows import add_rows_for_jobs, delivery_views
from service.errors import Conflict, NotFound
from service.jobs.lifecycle import TERMINAL, add_message, apply_update
from service.jobs.queue import Doorbell
from service.jobs.reaper import publish
from service.jobs.submit import add_job, resolve_inputs
from service.settings import Settings
from service.store.db import session_scope
from service.store.studies import get_series
from service.store.tables import Job, now


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """The tenant's job ``job_id`` (another tenant's job is not found)."""
    job = session.get(Job, job_id) if len(job_id) <= 32 else None
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"no job {job_id[:40]}")
    return job


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """Cancel a job: a queued one at once, a running one at its next progress point.

    Raises:
        NotFound: Unknown job or another tenant's.
        Conflict: The job has already finished.
    """
    job = get_job(session, tenant_id, job_id)
    queued = apply_update(
        session,
        update(Job)
        .where(Job.id == job.id, Job.state == "queued")
        .values(state="cancelled", cancel_requested=True, finished_at=now(), step="cancelled"),
    )
    if queued == 1:
        add_message(session, job.id, "cancelled before it started")
    else:
        running = apply_update(
            session,
            update(Job)
            .where(Job.id == job.id, Job.state == "running")
            .values(cancel_requested=True),
        )
        if running != 1:
            session.refresh(job)
            raise Conflict(f"job {job.id} has already {job.state}; nothing to cancel")
        add_message(session, job.id, "cancellation requested")
    session.flush()
    session.refresh(job)
    return job


def retry_job(settings: Settings, tenant_id: str, job_id: str) -> str:
    """Submit a new job with the same inputs, pipeline and parameters as a failed/cancelled one.

    The retry keeps the original's destinations (``deliver_to``) with fresh delivery rows.

    Returns:
        The new job's id (its ``retry_of`` names the original).

    Raises:
        Conflict: The job is queued, running or succeeded.
        NotFound: The job, or one of its input series (deleted study), is gone.
    """
    with session_scope(settings.resolved_database_url) as session:
        job = get_job(session, tenant_id, job_id)
        if job.state not in ("failed", "cancelled"):
            raise Conflict(
                f"job {job.id} is {job.state}; only failed or cancelled jobs are retried"
            )
        series = get_series(session, tenant_id, job.series_id)
        spec = get_spec(job.pipeline)
        new = add_job(
            session,
            tenant_id,
            series,
            spec,
            dict(job.params),
            job.priority,
            job.cohort_id,
            job.id,
            job.deliver_to,
            resolve_inputs(session, tenant_id, spec, job.inputs or {}),
        )
        if job.deliver_to:  # the retry delivers where the original would have
            add_rows_for_jobs(session, settings, [new.id], job.deliver_to)
        bell = Doorbell(new.id, new.pipeline, new.priority)
    publish(settings, [bell])
    return bell.job_id


def job_view(job: Job) -> dict[str, Any]:
    """JSON view of a job: state, progress %, step, messages, timings, outputs, error, deliveries.

    ``deliveries`` lists the job's deliveries to DICOM nodes (read through the job's session).
    """
    session = object_session(job)
    queued_s = (job.started_at - job.created_at) if job.started_at else None
    run_s = (job.finished_at - job.started_at) if job.finished_at and job.started_at else None
    return {
        "id": job.id,
        "state": job.state,
        "progress_percent": round(100.0 * job.progress, 1),
        "step": job.step,
        "pipeline": job.pipeline,
        "pipeline_version": job.pipeline_version,
        "params": job.params,
        "priority": job.priority,
        "queue": job.queue,
        "series_id": job.series_id,
        "inputs": dict(job.inputs or {}),
        "cohort_id": job.cohort_id,
        "retry_of": job.retry_of,
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "messages": job.messages,
        "error": {"code": job.error_code, "message": job.error} if job.error_code else None,
        "timings": {
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "queued_s": queued_s,
            "run_s": run_s,
        },
        "outputs": {
            name: {k: v for k, v in meta.items() if k != "key"}
            for name, meta in sorted(job.outputs.items())
        },
        "measurements": job.measurements,
        "finished": job.state in TERMINAL,
        "deliveries": delivery_views(session, job.id) if session is not None else [],
    }
