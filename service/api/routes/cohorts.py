"""``/cohorts``: run one pipeline over many series or studies; roll-up and CSV of results."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from sqlalchemy.orm import Session

from service.api.deps import Principal, get_app_settings, get_principal, get_session
from service.api.schemas import CohortRequest
from service.jobs.cohorts import cohort_csv, cohort_rollup
from service.jobs.submit import Target, submit_cohort
from service.settings import Settings
from service.store.db import session_scope

router = APIRouter(prefix="/cohorts", tags=["cohorts"])


@router.post("", status_code=201, summary="Submit a cohort")
def submit(
    body: CohortRequest,
    principal: Principal = Depends(get_principal),
    settings: Settings = Depends(get_app_settings),
) -> dict[str, Any]:
    """Fan out one job per item (each with its own extra inputs, e.g. its reference CT).

    The whole cohort is refused if any item is invalid.
    """
    cohort_id = submit_cohort(
        settings,
        principal.tenant_id,
        body.pipeline,
        body.params,
        priority=body.priority,
        targets=[Target(i.series_id, i.study_id, i.inputs) for i in body.items],
    )
    with session_scope(settings.resolved_database_url) as session:
        principal.audit(
            session,
            "cohort",
            "cohort",
            cohort_id,
            {"pipeline": body.pipeline, "items": len(body.items)},
        )
        return cohort_rollup(session, principal.tenant_id, cohort_id)


@router.get("/{cohort_id}", summary="Cohort roll-up")
def show(
    cohort_id: str,
    principal: Principal = Depends(get_principal),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    """Counts by state, overall progress and failures with their reasons."""
    return cohort_rollup(session, principal.tenant_id, cohort_id)


@router.get(
    "/{cohort_id}/results.csv", summary="Per-job results as CSV", response_class=PlainTextResponse
)
def results_csv(
    cohort_id: str,
    principal: Principal = Depends(get_principal),
    session: Session = Depends(get_session),
) -> PlainTextResponse:
    """One row per job: state, error, duration and scalar measurements."""
    text = cohort_csv(session, principal.tenant_id, cohort_id)
    return PlainTextResponse(
        text,
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="cohort-{cohort_id}.csv"'},
    )
