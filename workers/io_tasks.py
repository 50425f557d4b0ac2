"""Thin Celery tasks of the io queue that deliver job outputs to DICOM nodes.

A message carries one delivery id; the row in the job store is the source of truth (see
:mod:`service.delivery.rows`), so a duplicate or late message claims nothing and does nothing.
"""

from __future__ import annotations

from service.delivery.run import run_delivery
from service.jobs.queue import DELIVER_TASK
from service.settings import get_settings
from workers.celery_app import app

DELIVER_SOFT_LIMIT_S = 3600
DELIVER_HARD_LIMIT_S = 3660


@app.task(
    name=DELIVER_TASK,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    soft_time_limit=DELIVER_SOFT_LIMIT_S,
    time_limit=DELIVER_HARD_LIMIT_S,
)
def deliver(delivery_id: str) -> str | None:
    """Claim and run one attempt of delivery ``delivery_id`` (C-STORE or STOW-RS)."""
    return run_delivery(get_settings(), delivery_id)
