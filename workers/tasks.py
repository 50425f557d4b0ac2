"""Thin Celery tasks: a job id in, nothing else; the work is in :mod:`workers.job_runner`."""

from __future__ import annotations

from service.settings import get_settings
from workers.celery_app import app
from workers.job_runner import run_job as _run_job


@app.task(name="voxelgate.run_job", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str | None:
    """Claim and run the most urgent queued job of ``job_id``'s queue (see service.jobs.queue)."""
    return _run_job(get_settings(), job_id)
