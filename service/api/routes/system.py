"""``/health`` (no key needed) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.orm import Session

from service.api.deps import Principal, get_principal, get_session
from service.api.metrics import render_metrics

router = APIRouter(tags=["system"])


@router.get("/health", summary="Liveness and database check")
def health(session: Session = Depends(get_session)) -> Any:
    """``{"status": "ok"}`` when the job store answers, else 503."""
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:  # report any database failure as unhealthy, never raise
        return JSONResponse({"status": "unavailable", "database": type(exc).__name__}, 503)
    return {"status": "ok"}


@router.get("/metrics", summary="Prometheus metrics")
def metrics(
    _: Principal = Depends(get_principal), session: Session = Depends(get_session)
) -> Response:
    """Queue depth, jobs by state, job duration histogram, ingest bytes."""
    body, content_type = render_metrics(session)
    return Response(body, media_type=content_type)
