"""Cohorts: one pipeline over many series, submitted together; roll-up and per-job CSV.

A cohort's jobs are the job rows carrying its ``cohort_id``. When a job is retried and the retry
(a new row with ``retry_of`` = the old id) belongs to the cohort too, the retry replaces the
attempt it retries in every figure here, so a retried failure counts once, as its latest run.
A cohort of another tenant is "not found", like a missing one.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import NotFound
from service.jobs.lifecycle import STATES
from service.store.tables import Cohort, Job, Series

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
CSV_COLUMNS = (
    "job_id",
    "series_id",
    "series_instance_uid",
    "state",
    "progress",
    "error_code",
    "error",
    "duration_s",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class _JobView:
    id: str
    series_id: str
    series_instance_uid: str
    state: str
    progress: float
    error_code: str
    error: str
    started_at: float | None
    finished_at: float | None
    measurements: dict[str, Any]

    @property
    def done_fraction(self) -> float:
        """1 for a finished job, else its reported progress clamped to [0, 1]."""
        if self.state in TERMINAL:
            return 1.0
        p = float(self.progress or 0.0)
        return min(1.0, max(0.0, p)) if math.isfinite(p) else 0.0

    @property
    def duration_s(self) -> float | None:
        """Run time, seconds, when the job has started and finished."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)


def create_cohort_row(
    session: Session, tenant_id: str, pipeline: str, params: dict[str, Any]
) -> Cohort:
    """Insert a cohort; the caller then creates its jobs with ``cohort_id=cohort.id``.

    Args:
        session: Open session; the caller commits.
        tenant_id: Owner.
        pipeline: Registry name (already validated by the caller).
        params: Parameters as submitted (JSON-ready).

    Returns:
        The cohort, flushed so that its ``id`` is set.
    """
    cohort = Cohort(tenant_id=tenant_id, pipeline=pipeline, params=dict(params))
    session.add(cohort)
    session.flush()
    return cohort


def get_cohort(session: Session, tenant_id: str, cohort_id: str) -> Cohort:
    """Return the tenant's cohort.

    Raises:
        NotFound: No such cohort, or it belongs to another tenant.
    """
    cohort = session.get(Cohort, cohort_id)
    if cohort is None or cohort.tenant_id != tenant_id:
        raise NotFound(f"no cohort {cohort_id}")
    return cohort


def _current_jobs(
    session: Session, cohort: Cohort, *, with_measurements: bool = False
) -> list[_JobView]:
    """The cohort's jobs, oldest first, each retried attempt replaced by its retry."""
    columns = [
        Job.id,
        Job.series_id,
        Series.series_instance_uid,
        Job.state,
        Job.progress,
        Job.error_code,
        Job.error,
        Job.started_at,
        Job.finished_at,
        Job.retry_of,
    ]
    if with_measurements:
        columns.append(Job.measurements)
    rows = session.execute(
        select(*columns)
        .join(Series, Series.id == Job.series_id, isouter=True)
        .where(Job.cohort_id == cohort.id, Job.tenant_id == cohort.tenant_id)
        .order_by(Job.created_at, Job.id)
    ).all()
    superseded = {row.retry_of for row in rows if row.retry_of}
    return [
        _JobView(
            id=row.id,
            series_id=row.series_id,
            series_instance_uid=row.series_instance_uid or "",
            state=row.state,
            progress=row.progress,
            error_code=row.error_code or "",
            error=row.error or "",
            started_at=row.started_at,
            finished_at=row.finished_at,
            measurements=(row.measurements or {}) if with_measurements else {},
        )
        for row in rows
        if row.id not in superseded
    ]


def cohort_rollup(session: Session, tenant_id: str, cohort_id: str) -> dict[str, Any]:
    """Summarise a cohort's jobs.

    Args:
        session: Open session (read only).
        tenant_id: Tenant asking.
        cohort_id: The cohort.

    Returns:
        JSON-ready dict: ``id``, ``pipeline``, ``params``, ``created_at``, ``total`` (jobs),
        ``counts`` ({state: n} for every state), ``progress`` (0..1: mean over jobs, a finished
        job counting 1), ``done`` (every job finished; for a PACS-query cohort also its fetch),
        ``failures`` ([{job_id, series_id, error_code, error}] of failed jobs), ``job_ids``, and
        for a PACS-query cohort ``fetch`` (see :func:`service.dicom.pacs_cohort.fetch_summary`).

    Raises:
        NotFound: No such cohort for this tenant.
    """
    cohort = get_cohort(session, tenant_id, cohort_id)
    jobs = _current_jobs(session, cohort)
    counts = dict.fromkeys(STATES, 0)
    for job in jobs:
        counts[job.state] = counts.get(job.state, 0) + 1
    progress = sum(j.done_fraction for j in jobs) / len(jobs) if jobs else 0.0
    from service.dicom.pacs_cohort import fetch_summary  # lazy: it imports this module

    fetch = fetch_summary(cohort)
    fetching = fetch is not None and fetch["state"] in ("queued", "fetching")
    rollup = {
        "id": cohort.id,
        "pipeline": cohort.pipeline,
        "params": cohort.params,
        "created_at": cohort.created_at,
        "total": len(jobs),
        "counts": counts,
        "progress": round(progress, 6),
        "done": not fetching
        and (bool(jobs) or fetch is not None)
        and all(j.state in TERMINAL for j in jobs),
        "failures": [
            {
                "job_id": j.id,
                "series_id": j.series_id,
                "error_code": j.error_code,
                "error": j.error,
            }
            for j in jobs
            if j.state == "failed"
        ],
        "job_ids": [j.id for j in jobs],
    }
    if fetch is not None:
        rollup["fetch"] = fetch
    return rollup


def flatten_measurements(
    measurements: Mapping[str, Any], prefix: str = ""
) -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted.key, scalar)`` of nested measurements; lists and other values are skipped.

    Example: ``{"noise": {"sigma_hu": 12.5}, "slices": [1, 2]}`` yields
    ``("noise.sigma_hu", 12.5)`` only.
    """
    for key, value in measurements.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten_measurements(value, f"{name}.")
        elif value is None or isinstance(value, str | int | float | bool):
            yield name, value


def csv_safe_text(text: str) -> str:
    """Neutralise spreadsheet formula injection in a text cell (OWASP: prefix a quote)."""
    return "'" + text if text.lstrip(" ").startswith(_FORMULA_START) else text


def _cell(value: Any) -> str:
    """Format one CSV cell: numbers as numbers, text made formula-safe."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return csv_safe_text(str(value))


def cohort_csv(session: Session, tenant_id: str, cohort_id: str) -> str:
    """Per-job results of a cohort as CSV (RFC 4180, header row, CRLF line ends).

    Columns: :data:`CSV_COLUMNS`, then every flattened scalar measurement found in any job
    (sorted; empty where a job lacks it; a measurement whose name clashes with a fixed column
    is prefixed ``measurements.``). Text cells starting with ``= + - @``, tab or CR get a
    leading ``'`` so spreadsheets do not run them as formulas; numbers are written as numbers.

    Raises:
        NotFound: No such cohort for this tenant.
    """
    cohort = get_cohort(session, tenant_id, cohort_id)
    jobs = _current_jobs(session, cohort, with_measurements=True)
    flat: list[dict[str, Any]] = []
    for job in jobs:
        values = {}
        for key, value in flatten_measurements(job.measurements):
            column = f"measurements.{key}" if key in CSV_COLUMNS else key
            values[column] = value
        flat.append(values)
    extra = sorted(set().union(*flat)) if flat else []
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([csv_safe_text(c) for c in (*CSV_COLUMNS, *extra)])
    for job, values in zip(jobs, flat, strict=True):
        duration = job.duration_s
        fixed = [
            job.id,
            job.series_id,
            job.series_instance_uid,
            job.state,
            round(float(job.progress or 0.0), 6),
            job.error_code,
            job.error,
            None if duration is None else round(duration, 3),
        ]
        writer.writerow([_cell(v) for v in fixed] + [_cell(values.get(k)) for k in extra])
    return out.getvalue()
