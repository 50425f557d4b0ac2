"""``/jobs``: submit, status and progress, cancel, retry, download outputs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.deps import Principal, get_app_settings, get_blobs, get_principal, get_session
from service.api.schemas import JobRequest
from service.delivery.rows import publish as publish_deliveries
from service.delivery.rows import push
from service.dicom.config import load_dicom_config
from service.errors import NotFound
from service.jobs.control import cancel_job, get_job, job_view, retry_job
from service.jobs.lifecycle import JobState
from service.jobs.submit import submit_jobs
from service.settings import Settings
from service.store.blobs import BlobStore
from service.store.db import session_scope
from service.store.tables import Job

router = APIRouter(prefix="/jobs", tags=["jobs"])


def _view(settings: Settings, tenant_id: str, job_id: str) -> dict[str, Any]:
    with session_scope(settings.resolved_database_url) as session:
        return job_view(get_job(session, tenant_id, job_id))


@router.post("", status_code=201, summary="Submit a job")
def submit(
    body: JobRequest,
    principal: Principal = Depends(get_principal),
    settings: Settings = Depends(get_app_settings),
) -> dict[str, Any]:
    """Validate pipeline, parameters and inputs, persist the job, then queue it.

    Extra inputs (``inputs``: name -> series id) are checked like the main one: an unknown
    name (422, with a did-you-mean), a series not found (404), a sinogram or a modality the
    input does not accept (422).
    """
    (job_id,) = submit_jobs(
        settings,
        principal.tenant_id,
        body.pipeline,
        body.params,
        series_ids=[body.series_id] if body.series_id else [],
        study_ids=[body.study_id] if body.study_id else [],
        priority=body.priority,
        inputs=body.inputs,
    )
    with session_scope(settings.resolved_database_url) as session:
        principal.audit(session, "submit", "job", job_id, {"pipeline": body.pipeline})
    return _view(settings, principal.tenant_id, job_id)


@router.get("", summary="List jobs")
def list_jobs(
    state: JobState | None = Query(None, description="only jobs in this state"),
    limit: int = Query(100, ge=1, le=1000),
    principal: Principal = Depends(get_principal),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    """The tenant's most recent jobs."""
    query = select(Job).where(Job.tenant_id == principal.tenant_id)
    if state:
        query = query.where(Job.state == state)
    jobs = session.scalars(query.order_by(Job.created_at.desc()).limit(limit)).all()
    return {"jobs": [job_view(j) for j in jobs]}


@router.get("/{job_id}", summary="Job status")
def show(
    job_id: str,
    principal: Principal = Depends(get_principal),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    """State, progress %, current step, messages, timings and outputs."""
    return job_view(get_job(session, principal.tenant_id, job_id))


@router.delete("/{job_id}", status_code=202, summary="Cancel a job")
def cancel(
    job_id: str,
    principal: Principal = Depends(get_principal),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    """A queued job is cancelled at once; a running one stops at its next progress point."""
    job = cancel_job(session, principal.tenant_id, job_id)
    principal.audit(session, "cancel", "job", job.id)
    return job_view(job)


@router.post("/{job_id}/retry", status_code=201, summary="Retry a failed or cancelled job")
def retry(
    job_id: str,
    principal: Principal = Depends(get_principal),
    settings: Settings = Depends(get_app_settings),
) -> dict[str, Any]:
    """Queue a new job with the same input, pipeline and parameters (``retry_of`` links them)."""
    new_id = retry_job(settings, principal.tenant_id, job_id)
    with session_scope(settings.resolved_database_url) as session:
        principal.audit(session, "retry", "job", new_id, {"retry_of": job_id})
    return _view(settings, principal.tenant_id, new_id)


@router.get("/{job_id}/outputs/{name}", summary="Download an output", response_class=FileResponse)
def download(
    job_id: str,
    name: str,
    principal: Principal = Depends(get_principal),
    session: Session = Depends(get_session),
    blobs: BlobStore = Depends(get_blobs),
) -> FileResponse:
    """One output file: NIfTI, a DICOM series as zip, result.json or a PNG."""
    job = get_job(session, principal.tenant_id, job_id)
    meta = job.outputs.get(name)
    if meta is None:
        known = ", ".join(sorted(job.outputs)) or "none yet"
        raise NotFound(f"job {job.id} has no output {name[:64]!r} (outputs: {known})")
    path = blobs.path_of(meta["key"])
    if not path.is_file():  # recorded but gone (removed from the store): not found, not a 500
        raise NotFound(f"job {job.id}: the file of output {name[:64]!r} is no longer stored")
    principal.audit(session, "download", "job", job.id, {"output": name})
    return FileResponse(path, media_type=meta["media_type"], filename=name)


class DeliveryRequest(BaseModel):
    """Send a job's DICOM outputs to configured nodes (``GET /dicom/nodes``)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"nodes": ["pacs"], "force": False}]}
    )
    nodes: list[str] = Field(..., min_length=1, max_length=16, description="node names")
    force: bool = Field(False, description="send again to nodes that already have them")


@router.post("/{job_id}/deliveries", status_code=202, summary="Deliver outputs to DICOM nodes")
def deliver(
    job_id: str,
    body: DeliveryRequest,
    principal: Principal = Depends(get_principal),
    settings: Settings = Depends(get_app_settings),
) -> dict[str, Any]:
    """Queue delivery of the job's DICOM outputs to each node (C-STORE or STOW-RS).

    Idempotent per (job, node): a node that has them already is left alone unless ``force``; a
    failed delivery starts again; an unfinished job's delivery waits for it.
    """
    config = load_dicom_config(settings)
    with session_scope(settings.resolved_database_url) as session:
        job = get_job(session, principal.tenant_id, job_id)
        results, to_publish = push(
            settings, config, job, session, body.nodes, force=body.force, key_id=principal.key_id
        )
    publish_deliveries(settings, to_publish)
    view = _view(settings, principal.tenant_id, job_id)
    view["pushed"] = [{"node": r.node, "id": r.delivery_id, "action": r.action} for r in results]
    return view
