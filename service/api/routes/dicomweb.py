"""``/dicomweb``: STOW-RS store (PS3.18 §10.5) into the caller's tenant, then routing.

``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study_uid}`` take
``multipart/related; type="application/dicom"``; every valid part is stored (grouped into
studies and series like a REST upload, ``source="stow"``), the routing rules run on the series
that got new instances (``Arrival("stow")``), and the answer lists stored and failed instances
(see :mod:`service.ingest.stow`).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from models.errors import VoxelgateError
from service.api.deps import Principal, get_app_settings, get_blobs, get_principal
from service.api.metrics import INGEST_BYTES
from service.dicom.config import DicomConfig, load_dicom_config
from service.dicom.routing import Arrival, route_series
from service.ingest import stow
from service.settings import Settings
from service.store.blobs import BlobStore
from service.store.db import session_scope
from service.store.studies import ingest_files

log = logging.getLogger(__name__)
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
DICOM_JSON = "application/dicom+json"

_DOC = """STOW-RS: store DICOM instances sent as `multipart/related; type="application/dicom"`
(one Part 10 file per part). Answers `application/dicom+json` with `ReferencedSOPSequence`
(stored) and `FailedSOPSequence` (each with a `FailureReason`): 200 when all were stored, 202
when some failed, 409 when none was. Matching routing rules queue their pipelines."""


def _store(
    settings: Settings,
    blobs: BlobStore,
    principal: Principal,
    parts: list[stow.Part],
    study_uid: str | None,
) -> list[str]:
    """Validate each part, store the valid ones one patient at a time; return new series ids."""
    for part in parts:
        stow.validate_part(part, principal.tenant_id, study_uid)
    by_patient: dict[str, list[stow.Part]] = {}
    for part in parts:
        if part.scanned is not None and not part.failure:
            by_patient.setdefault(part.scanned.patient_key, []).append(part)
    new_series: list[str] = []
    for group in by_patient.values():
        try:
            with session_scope(settings.resolved_database_url) as session:
                files = [p.path for p in group]
                report = ingest_files(
                    session, blobs, principal.tenant_id, files, settings, source="stow"
                )
                for sid in report.study_ids:
                    detail = {"source": "stow", "instances_stored": report.instances_stored}
                    principal.audit(session, "receive", "study", sid, detail)
        except VoxelgateError as exc:  # the store refused this patient's instances
            for part in group:
                part.fail(stow.PROCESSING_FAILURE, str(exc))
            continue
        INGEST_BYTES.inc(report.bytes_stored)
        new_series += [sid for sid, n in report.series_stored.items() if n > 0]
    return new_series


def _route(settings: Settings, config: DicomConfig, tenant_id: str, series: list[str]) -> int:
    if not series or not config.rules:
        return 0
    return len(route_series(settings, config, tenant_id, series, Arrival("stow")))


async def _stow(
    request: Request,
    study_uid: str | None,
    principal: Principal,
    settings: Settings,
    blobs: BlobStore,
) -> JSONResponse:
    config = load_dicom_config(settings)  # an invalid file refuses the request before storing
    with blobs.staging_area() as staging:
        parts = await stow.receive_parts(request, staging, settings)
        new_series = await run_in_threadpool(_store, settings, blobs, principal, parts, study_uid)
    routed = await run_in_threadpool(_route, settings, config, principal.tenant_id, new_series)
    result = stow.answer(parts)
    log.info(
        "stow: tenant %s: %d part(s), %d failed, %d job(s) routed",
        principal.tenant_id,
        len(parts),
        sum(1 for p in parts if p.failure),
        routed,
    )
    return JSONResponse(result.body, status_code=result.status, media_type=DICOM_JSON)


_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "content": {"multipart/related": {"schema": {"type": "string", "format": "binary"}}},
        "required": True,
    }
}


@router.post(
    "/studies", summary="STOW-RS store instances", description=_DOC, openapi_extra=_OPENAPI
)
async def store_instances(
    request: Request,
    principal: Principal = Depends(get_principal),
    settings: Settings = Depends(get_app_settings),
    blobs: BlobStore = Depends(get_blobs),
) -> JSONResponse:
    """Store the instances of any studies."""
    return await _stow(request, None, principal, settings, blobs)


@router.post(
    "/studies/{study_uid}",
    summary="STOW-RS store instances of one study",
    description=_DOC + " Instances of another study fail with reason 0x0110.",
    openapi_extra=_OPENAPI,
)
async def store_study_instances(
    study_uid: str,
    request: Request,
    principal: Principal = Depends(get_principal),
    settings: Settings = Depends(get_app_settings),
    blobs: BlobStore = Depends(get_blobs),
) -> JSONResponse:
    """Store instances that belong to study ``study_uid``."""
    return await _stow(request, study_uid[:64], principal, settings, blobs)
