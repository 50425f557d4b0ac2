"""``/studies``: upload (multipart DICOM files, a zip, or NIfTI), list, show, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.api.deps import Principal, get_app_settings, get_blobs, get_principal, get_session
from service.api.metrics import INGEST_BYTES
from service.ingest.grouping import check_modality
from service.ingest.receive import receive_upload
from service.settings import Settings
from service.store.blobs import BlobStore
from service.store.db import session_scope
from service.store.studies import (
    delete_study,
    get_study,
    ingest_files,
    list_studies,
    study_summary,
)

router = APIRouter(prefix="/studies", tags=["studies"])

_UPLOAD_DOC = """Upload DICOM instances (any number of files in one multipart/form-data request, or
a zip archive) or one NIfTI volume. The body is streamed to disk, validated and grouped into
studies and series; nothing is stored unless the whole upload is valid. Re-uploading the same
instances is idempotent. Raw bodies are accepted with `Content-Type: application/zip`,
`application/dicom` or `application/octet-stream`.

A NIfTI file records no modality (unless voxelgate wrote it) and is stored as `OT` unless the
query parameter `nifti_modality` declares it; `?nifti_modality=CT` is the statement that its
values are Hounsfield units, and the worker then reads it as a CT in HU (as CT-only pipelines
such as `cbct-to-sct` need). A declaration contradicting the modality the file's own header
names is refused (422), never relabelled."""

_NIFTI_MODALITY_DOC = (
    "DICOM modality code of the uploaded NIfTI files (e.g. CT, MR), which record none unless "
    "voxelgate wrote them. CT declares that the voxel values are Hounsfield units: jobs read the "
    "file as a CT in HU. Empty: from the file's voxelgate header, else OT (other). Refused "
    "(422) when the file's header names another modality."
)


def _ingest(
    settings: Settings,
    blobs: BlobStore,
    principal: Principal,
    files: list[Any],
    nifti_modality: str = "",
) -> dict[str, Any]:
    with session_scope(settings.resolved_database_url) as session:
        report = ingest_files(
            session, blobs, principal.tenant_id, files, settings, nifti_modality=nifti_modality
        )
        studies = [
            study_summary(session, get_study(session, principal.tenant_id, sid))
            for sid in report.study_ids
        ]
        for sid in report.study_ids:
            principal.audit(
                session,
                "upload",
                "study",
                sid,
                {
                    "instances_stored": report.instances_stored,
                    "instances_duplicate": report.instances_duplicate,
                },
            )
    INGEST_BYTES.inc(report.bytes_stored)
    return {
        "studies": studies,
        "instances_stored": report.instances_stored,
        "instances_duplicate": report.instances_duplicate,
        "bytes_stored": report.bytes_stored,
    }


@router.post(
    "",
    status_code=201,
    summary="Upload DICOM or NIfTI",
    description=_UPLOAD_DOC,
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "files": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            }
                        },
                    }
                },
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
                "application/dicom": {"schema": {"type": "string", "format": "binary"}},
            },
            "required": True,
        }
    },
)
async def upload_study(
    request: Request,
    principal: Principal = Depends(get_principal),
    settings: Settings = Depends(get_app_settings),
    blobs: BlobStore = Depends(get_blobs),
    nifti_modality: str = Query("", max_length=16, description=_NIFTI_MODALITY_DOC),
) -> dict[str, Any]:
    """Receive, validate, group and store an upload; answer with its studies and series."""
    modality = nifti_modality.strip().upper()
    if modality:
        check_modality(modality)  # before the body is received
    with blobs.staging_area() as staging:
        files = await receive_upload(request, staging, settings)
        return await run_in_threadpool(_ingest, settings, blobs, principal, files, modality)


@router.get("", summary="List studies")
def list_all(
    principal: Principal = Depends(get_principal), session: Session = Depends(get_session)
) -> dict[str, Any]:
    """The tenant's studies with their series."""
    return {
        "studies": [study_summary(session, s) for s in list_studies(session, principal.tenant_id)]
    }


@router.get("/{study_id}", summary="Show a study")
def show(
    study_id: str,
    principal: Principal = Depends(get_principal),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    """Series, modality, sizes and geometry summary of one study."""
    return study_summary(session, get_study(session, principal.tenant_id, study_id))


@router.delete("/{study_id}", status_code=204, summary="Delete a study")
def delete(
    study_id: str,
    principal: Principal = Depends(get_principal),
    session: Session = Depends(get_session),
    blobs: BlobStore = Depends(get_blobs),
) -> Response:
    """Delete a study's instances; jobs that used it keep their outputs."""
    delete_study(session, blobs, principal.tenant_id, study_id)
    principal.audit(session, "delete", "study", study_id)
    return Response(status_code=204)
