"""Thin Celery tasks of the io queue that fetch PACS-query cohorts.

A message carries one cohort id; the cohort row is the source of truth (see
:mod:`service.dicom.pacs_cohort`): a finished fetch is not run again, an interrupted one resumes.
"""

from __future__ import annotations

from service.dicom.pacs_cohort import fetch_cohort as _fetch_cohort
from service.jobs.queue import FETCH_COHORT_TASK
from service.settings import get_settings
from workers.celery_app import app

FETCH_SOFT_LIMIT_S = 6 * 3600
FETCH_HARD_LIMIT_S = FETCH_SOFT_LIMIT_S + 60


@app.task(
    name=FETCH_COHORT_TASK,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    soft_time_limit=FETCH_SOFT_LIMIT_S,
    time_limit=FETCH_HARD_LIMIT_S,
)
def fetch_cohort(cohort_id: str) -> str | None:
    """Find, retrieve and queue the studies of PACS-query cohort ``cohort_id``."""
    return _fetch_cohort(get_settings(), cohort_id)
