"""The job state machine on the worker: claim -> load -> compute -> write outputs -> finish.

Exceptions become job states here, once: ``Cancelled`` -> cancelled; a
:class:`~models.errors.VoxelgateError` -> failed with its code and message; Celery's soft time
limit -> failed (``time_limit``); anything else -> failed (``internal_error``). An attempt that
lost its job writes nothing visible: its outputs folder is removed.
"""

from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from models.errors import Cancelled, VoxelgateError
from models.provenance import file_sha256
from models.registry import get_spec
from service.delivery import rows as deliveries
from service.dicom.config import load_dicom_config
from service.io.atomic import atomic_file
from service.jobs import lifecycle
from service.jobs.lifecycle import Claim
from service.settings import Settings
from service.store.blobs import BlobStore, blob_store
from service.store.db import session_scope
from service.store.studies import get_series, series_input_path
from service.store.tables import Series, Study
from workers.job_progress import JobProgress, OwnershipLost
from workers.runner import LocalJob, run_local

log = logging.getLogger(__name__)

MEDIA_TYPES = {
    ".nii.gz": "application/gzip",
    ".json": "application/json",
    ".png": "image/png",
    ".zip": "application/zip",
    ".html": "text/html",
    ".pdf": "application/pdf",
    ".dcm": "application/dicom",
}


def _media_type(name: str) -> str:
    return next((t for s, t in MEDIA_TYPES.items() if name.endswith(s)), "application/octet-stream")


def _zip_folder(folder: Path, dest: Path) -> None:
    with atomic_file(dest) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())


def index_outputs(blobs: BlobStore, out_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Name each downloadable output: top-level files as they are, each DICOM series as a zip.

    Returns:
        ``{name: {"key", "size", "sha256", "media_type"}}``; sha256 is that of result.json's
        listing for files, and of the zip itself for DICOM series zips.
    """
    dicom_root = out_dir / "dicom"
    if dicom_root.is_dir():
        for series_dir in sorted(p for p in dicom_root.iterdir() if p.is_dir()):
            _zip_folder(series_dir, out_dir / f"{series_dir.name}_dicom.zip")
    files = record.get("files", {})
    outputs: dict[str, Any] = {}
    for path in sorted(p for p in out_dir.iterdir() if p.is_file()):
        outputs[path.name] = {
            "key": blobs.key_of(path),
            "size": path.stat().st_size,
            "sha256": files.get(path.name) or file_sha256(path),
            "media_type": _media_type(path.name),
        }
    return outputs


def declared_modality(series: Series) -> str | None:
    """The modality to apply when loading a stored series (``None``: as its files say).

    A NIfTI file records no modality unless voxelgate wrote it, so a NIfTI series is loaded with
    the modality stored at upload (declared with ``nifti_modality``, else from the file's
    voxelgate header, else ``"OT"``): a file read as ``"OT"`` then takes it, a declared CT in
    HU; a file naming another modality fails the job
    (:func:`service.io.read_any.declare_modality`). DICOM and sinogram series carry their own.
    """
    if series.kind != "nifti" or not series.modality:
        return None
    return str(series.modality)


def _execute(settings: Settings, claim: Claim, progress: JobProgress) -> None:
    blobs = blob_store(settings)
    with session_scope(settings.resolved_database_url) as session:
        series = get_series(session, claim.tenant_id, claim.series_id)
        input_path = series_input_path(session, blobs, series)
        study = session.get(Study, series.study_id)
        derived_study_uid = study.study_instance_uid if study and study.uid_derived else None
        extras = {
            name: get_series(session, claim.tenant_id, sid) for name, sid in claim.inputs.items()
        }
        extra_inputs = {  # the same loader reads them (their stored folder or NIfTI file)
            name: series_input_path(session, blobs, s) for name, s in extras.items()
        }
        extra_modalities = {
            name: m for name, s in extras.items() if (m := declared_modality(s)) is not None
        }
        modality = declared_modality(series)
    out_dir = blobs.attempt_dir(claim.job_id, claim.token)
    job = LocalJob(
        claim.pipeline,
        input_path,
        out_dir,
        claim.params,
        series_uid=None,  # the stored series folder holds this series only
        # Stored files keep their StudyInstanceUID as uploaded, possibly empty (ingest records a
        # derived UID in the store only): the derived output series then joins that derived
        # study, so every result of the same source lands in one study (store and PACS).
        allow_missing_study_uid=True,
        study_uid=derived_study_uid,
        extra_inputs=extra_inputs,
        modality=modality,
        extra_modalities=extra_modalities,
    )
    try:
        record = run_local(job, progress)
        progress.check()
        outputs = index_outputs(blobs, out_dir, record)
        won = lifecycle.finish(
            settings,
            claim,
            "succeeded",
            outputs=outputs,
            measurements=record.get("measurements", {}),
            message=f"succeeded on attempt {claim.attempt}",
        )
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    if not won:
        shutil.rmtree(out_dir, ignore_errors=True)
        log.warning(
            "job %s: attempt lost the job before finishing; outputs discarded", claim.job_id
        )


def run_job(settings: Settings, hint_job_id: str) -> str | None:
    """Claim and run one job for the message ``hint_job_id``.

    Returns:
        The id of the job that was run, or None when nothing was queued.
    """
    claim = lifecycle.claim(settings, hint_job_id)
    if claim is None:
        return None
    log.info("job %s: attempt %d of %s started", claim.job_id, claim.attempt, claim.pipeline)
    spec = get_spec(claim.pipeline)
    try:
        with JobProgress(settings, claim, spec.time_limit_s) as progress:
            _execute(settings, claim, progress)
    except OwnershipLost:
        log.warning("job %s: ownership lost; stopped without outputs", claim.job_id)
    except Cancelled:
        lifecycle.finish(settings, claim, "cancelled", message="cancelled while running")
    except SoftTimeLimitExceeded:
        lifecycle.finish(
            settings,
            claim,
            "failed",
            error_code="time_limit",
            error=f"{claim.pipeline} exceeded its time limit of {spec.time_limit_s} s",
        )
    except VoxelgateError as exc:
        lifecycle.finish(settings, claim, "failed", error_code=exc.code, error=str(exc))
    except Exception as exc:  # translate once: an unexpected error fails the job, visibly
        log.exception("job %s failed unexpectedly", claim.job_id)
        lifecycle.finish(
            settings,
            claim,
            "failed",
            error_code="internal_error",
            error=f"{type(exc).__name__}: {exc}",
        )
    _start_deliveries(settings, claim.job_id)
    return claim.job_id


def _start_deliveries(settings: Settings, job_id: str) -> None:
    """Queue the deliveries of a finished job (the reaper does it later if this fails)."""
    try:
        deliveries.after_job(settings, load_dicom_config(settings), job_id)
    except Exception:  # the job is finished either way; the reaper's pass retries the hand-over
        log.exception("job %s: starting its deliveries failed; the reaper will retry", job_id)
