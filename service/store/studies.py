"""Studies, series and instances: ingest an upload, list, look up, summarise, delete.

Every function is scoped by tenant: another tenant's study or series is :class:`NotFound`, like
a missing or deleted one. The caller owns the transaction (``session_scope``) and commits.

**Ingest** (:func:`ingest_files`) is all-or-nothing. Files are scanned and grouped first (no
database work, no blob written); then, inside a SAVEPOINT, rows are inserted and files moved into
the blob store (UID-addressed keys, atomic renames). On any error the savepoint rolls back and
every blob written by this call is removed, so an earlier stored study is never altered and no
partial study remains. Re-uploading an instance (same SOPInstanceUID in the same series) stores
nothing and counts it as a duplicate; the stored file is kept even if the new one differs
(counted in ``duplicates_differing``). Uploading into a soft-deleted study revives it.

*SQLite note*: pysqlite opens the transaction lazily, so when the upload's SAVEPOINT is the first
statement of the transaction its RELEASE commits it; the caller's later rollback then does not
undo a completed ingest (a failed ingest is always undone). PostgreSQL nests as expected.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.errors import InputRejected
from models.provenance import file_sha256
from service.errors import Conflict, NotFound
from service.ingest.geometry import dicom_series_geometry
from service.ingest.grouping import (
    SeriesGroup,
    StudyGroup,
    check_single_patient,
    group_studies,
    scan_upload,
)
from service.ingest.scan import ScannedFile, scan_file
from service.settings import Settings
from service.store.blobs import BlobStore, instance_file_name
from service.store.tables import Instance, Series, Study, new_id, now

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    """Outcome of one :func:`ingest_files` call.

    Attributes:
        study_ids: Studies the upload went to, in upload order (new, existing or revived).
        instances_stored: Files stored by this call.
        instances_duplicate: Files not stored because their SOPInstanceUID was already in the
            series (stored earlier, or earlier in the same upload).
        bytes_stored: Bytes of the files stored by this call.
        series_ids: Series the upload went to, in upload order.
        duplicates_differing: Duplicates whose content differs from the kept file.
        series_stored: Files stored by this call per series id (0 for a series that only got
            duplicates).
    """

    study_ids: list[str]
    instances_stored: int
    instances_duplicate: int
    bytes_stored: int
    series_ids: list[str] = field(default_factory=list)
    duplicates_differing: int = 0
    series_stored: dict[str, int] = field(default_factory=dict)


@dataclass
class _Written:
    """Blobs written and studies created by one ingest (removed again when it fails)."""

    keys: list[str] = field(default_factory=list)
    new_study_ids: list[str] = field(default_factory=list)


def ingest_files(
    session: Session,
    blobs: BlobStore,
    tenant_id: str,
    files: list[Path],
    settings: Settings,
    *,
    nifti_modality: str = "",
    source: str = "upload",
) -> IngestReport:
    """Validate, group and store the files of one upload.

    Args:
        session: Open session; the caller commits.
        blobs: The blob store.
        tenant_id: Owner of the upload.
        files: Staged files (see :func:`service.ingest.receive.receive_upload`). They are
            **moved** into the store (or left in place when not stored); pass staged copies only.
        settings: Service settings (kept for future limits; the upload limits apply earlier).
        nifti_modality: Modality code of NIfTI files (e.g. ``"CT"``); ``""``: from the file's
            voxelgate header extension, else ``"OT"``.
        source: How a new study arrived: ``"upload"`` (REST), ``"dimse"`` (C-STORE),
            ``"stow"`` (STOW-RS), ``"pacs"`` (retrieved by C-GET/C-MOVE/WADO-RS).

    Returns:
        The :class:`IngestReport`.

    Raises:
        InputRejected: A file that is neither DICOM nor NIfTI, corrupt or truncated (named by
            its upload name); several patients in one upload, or a patient other than the one of
            the stored study with the same StudyInstanceUID; an invalid ``nifti_modality``.
        Conflict: A concurrent upload stored the same study first (retry).
    """
    del settings  # limits are enforced while receiving
    scanned = scan_upload(files, tenant_id)
    check_single_patient(scanned)
    groups = group_studies(scanned, nifti_modality)
    written = _Written()
    try:
        with session.begin_nested():
            report = _store_groups(session, blobs, tenant_id, groups, written, source)
            session.flush()
    except IntegrityError as exc:
        _discard(blobs, written)
        raise Conflict("another upload stored the same study at the same time; retry") from exc
    except BaseException:
        _discard(blobs, written)
        raise
    log.info(
        "ingest: tenant %s stored %d instances (%d bytes, %d duplicates) in %d studies",
        tenant_id,
        report.instances_stored,
        report.bytes_stored,
        report.instances_duplicate,
        len(report.study_ids),
    )
    return report


def _discard(blobs: BlobStore, written: _Written) -> None:
    """Remove what a failed ingest wrote: its blobs, and the folders of studies it created."""
    blobs.delete_keys(written.keys)
    for study_id in written.new_study_ids:
        blobs.delete_study(study_id)


def _store_groups(
    session: Session,
    blobs: BlobStore,
    tenant_id: str,
    groups: Sequence[StudyGroup],
    written: _Written,
    source: str,
) -> IngestReport:
    report = IngestReport(study_ids=[], instances_stored=0, instances_duplicate=0, bytes_stored=0)
    for group in groups:
        study = _study_row(session, tenant_id, group, written, source)
        report.study_ids.append(study.id)
        for series_group in group.series.values():
            series = _series_row(session, study, series_group)
            report.series_ids.append(series.id)
            _store_instances(
                session, blobs, tenant_id, study, series, series_group, written, report
            )
    return report


def _study_row(
    session: Session, tenant_id: str, group: StudyGroup, written: _Written, source: str
) -> Study:
    """The study row of a group: existing (checked, revived if deleted) or new."""
    study = session.scalars(
        select(Study).where(
            Study.tenant_id == tenant_id, Study.study_instance_uid == group.study_uid
        )
    ).one_or_none()
    if study is None:
        study = Study(
            id=new_id(),
            tenant_id=tenant_id,
            study_instance_uid=group.study_uid,
            patient_key=group.patient_key,
            study_date=group.study_date,
            source=source,
            uid_derived=group.uid_derived,
        )
        session.add(study)
        session.flush()
        written.new_study_ids.append(study.id)
        return study
    if study.patient_key and group.patient_key and study.patient_key != group.patient_key:
        raise InputRejected(
            f"the upload's patient differs from the patient of stored study {study.id} with the "
            "same StudyInstanceUID; nothing was stored"
        )
    if study.deleted_at is not None:
        study.deleted_at = None
        study.patient_key = group.patient_key
    return study


def _series_row(session: Session, study: Study, group: SeriesGroup) -> Series:
    """The series row of a group: existing (a NIfTI's modality restated) or new."""
    series = session.scalars(
        select(Series).where(
            Series.study_id == study.id, Series.series_instance_uid == group.series_uid
        )
    ).one_or_none()
    if series is not None and group.kind == "nifti" and series.modality != group.modality:
        _restate_nifti_modality(session, series, group)
    if series is None:
        series = Series(
            id=new_id(),
            study_id=study.id,
            series_instance_uid=group.series_uid,
            kind=group.kind,
            modality=group.modality,
            description=group.description,
            body_part=group.body_part,
            geometry=group.geometry,
            uid_derived=group.uid_derived,
        )
        session.add(series)
        session.flush()
    return series


def _restate_nifti_modality(session: Session, series: Series, group: SeriesGroup) -> None:
    """A stored NIfTI uploaded again (same file, same series) with another modality.

    Its study was deleted (no instance left): the new upload's modality replaces the old one.
    Otherwise an undeclared re-upload keeps the stored modality, a declared one fills in a
    stored ``"OT"``, and one contradicting the stored modality is refused.

    Raises:
        InputRejected: The declared modality contradicts the stored one.
    """
    held = session.scalar(
        select(func.count()).select_from(Instance).where(Instance.series_id == series.id)
    )
    if not held or series.modality in ("", "OT"):
        series.modality = group.modality
    elif group.modality != "OT":
        raise InputRejected(
            f"{group.description}: this NIfTI is already stored as series {series.id} with "
            f"modality {series.modality}, not {group.modality}; nothing was stored"
        )


def _suffix(item: ScannedFile) -> str:
    if item.kind == "sinogram":
        return item.stored_suffix
    if item.kind == "nifti":
        return ".nii.gz" if item.nifti_gzip else ".nii"
    return ".dcm"


def _store_instances(
    session: Session,
    blobs: BlobStore,
    tenant_id: str,
    study: Study,
    series: Series,
    group: SeriesGroup,
    written: _Written,
    report: IngestReport,
) -> None:
    """Move the new files of a series into the store and add their rows; count duplicates."""
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.sha256).where(Instance.series_id == series.id)
    )
    stored = {uid: sha for uid, sha in rows}
    known = dict(stored)
    added = 0
    report.series_stored.setdefault(series.id, 0)
    for item in group.files:
        if item.sop_instance_uid in known:
            report.instances_duplicate += 1
            report.duplicates_differing += int(known[item.sop_instance_uid] != item.sha256)
            continue
        file_name = instance_file_name(item.sop_instance_uid, _suffix(item))
        key = blobs.instance_key(study.id, series.id, file_name)
        if blobs.put_file(item.path, key):
            written.keys.append(key)
        elif file_sha256(blobs.path_of(key)) != item.sha256:
            # a blob without a row: left by an interrupted upload, or a concurrent one
            raise Conflict(f"{item.label}: another file is being stored under the same instance")
        session.add(
            Instance(
                series_id=series.id,
                sop_instance_uid=item.sop_instance_uid,
                blob_key=key,
                sha256=item.sha256,
                size_bytes=item.size,
            )
        )
        known[item.sop_instance_uid] = item.sha256
        added += 1
        report.series_stored[series.id] = report.series_stored.get(series.id, 0) + 1
        report.instances_stored += 1
        report.bytes_stored += item.size
    if added and not stored:
        series.geometry = group.geometry
    elif added and series.kind == "dicom":
        session.flush()
        series.geometry = _stored_geometry(session, blobs, tenant_id, series)


def _stored_geometry(
    session: Session, blobs: BlobStore, tenant_id: str, series: Series
) -> dict[str, Any]:
    """Geometry of a DICOM series from the headers of all its stored files."""
    keys = session.scalars(
        select(Instance.blob_key).where(Instance.series_id == series.id).order_by(Instance.id)
    ).all()
    files = [scan_file(blobs.path_of(k), tenant_id, label=k.rsplit("/", 1)[-1]) for k in keys]
    present = [f for f in files if f is not None]
    return dicom_series_geometry(
        [f.slices for f in present],
        [f.geometry_error for f in present],
        present[0].slice_thickness if present else None,
    )


# -- queries -----------------------------------------------------------------------------------


def list_studies(session: Session, tenant_id: str) -> list[Study]:
    """The tenant's studies that are not deleted, oldest first."""
    return list(
        session.scalars(
            select(Study)
            .where(Study.tenant_id == tenant_id, Study.deleted_at.is_(None))
            .order_by(Study.created_at, Study.id)
        )
    )


def get_study(session: Session, tenant_id: str, study_id: str) -> Study:
    """The tenant's study ``study_id``.

    Raises:
        NotFound: Missing, deleted, or another tenant's.
    """
    study = session.get(Study, study_id)
    if study is None or study.tenant_id != tenant_id or study.deleted_at is not None:
        raise NotFound(f"study {study_id[:40]} not found")
    return study


def get_series(session: Session, tenant_id: str, series_id: str) -> Series:
    """The tenant's series ``series_id`` (its study not deleted).

    Raises:
        NotFound: Missing, in a deleted study, or another tenant's.
    """
    row = session.execute(
        select(Series, Study).join(Study, Series.study_id == Study.id).where(Series.id == series_id)
    ).one_or_none()
    if row is None or row[1].tenant_id != tenant_id or row[1].deleted_at is not None:
        raise NotFound(f"series {series_id[:40]} not found")
    return row[0]


def _series_counts(session: Session, series_ids: list[str]) -> dict[str, tuple[int, int]]:
    """Instance count and total bytes of each series that has instances."""
    if not series_ids:
        return {}
    rows = session.execute(
        select(Instance.series_id, func.count(Instance.id), func.sum(Instance.size_bytes))
        .where(Instance.series_id.in_(series_ids))
        .group_by(Instance.series_id)
    )
    return {sid: (int(count), int(size or 0)) for sid, count, size in rows}


def study_summary(session: Session, study: Study) -> dict[str, Any]:
    """JSON-ready summary of a study and its series (series without instances are left out).

    Returns:
        ``{id, study_instance_uid, study_date, created_at, uid_derived, instance_count,
        size_bytes, series: [{id, series_instance_uid, modality, description, kind,
        instance_count, size_bytes, geometry, uid_derived}]}``.
    """
    series_rows = list(
        session.scalars(
            select(Series)
            .where(Series.study_id == study.id)
            .order_by(Series.created_at, Series.series_instance_uid)
        )
    )
    counts = _series_counts(session, [s.id for s in series_rows])
    series = [
        {
            "id": s.id,
            "series_instance_uid": s.series_instance_uid,
            "modality": s.modality,
            "description": s.description,
            "kind": s.kind,
            "instance_count": counts[s.id][0],
            "size_bytes": counts[s.id][1],
            "geometry": s.geometry,
            "uid_derived": s.uid_derived,
        }
        for s in series_rows
        if s.id in counts
    ]
    return {
        "id": study.id,
        "study_instance_uid": study.study_instance_uid,
        "study_date": study.study_date,
        "created_at": study.created_at,
        "uid_derived": study.uid_derived,
        "instance_count": sum(counts[s.id][0] for s in series_rows if s.id in counts),
        "size_bytes": sum(counts[s.id][1] for s in series_rows if s.id in counts),
        "series": series,
    }


def delete_study(session: Session, blobs: BlobStore, tenant_id: str, study_id: str) -> None:
    """Soft-delete a study: ``deleted_at`` set, instance rows and blobs removed.

    Series rows stay so that job rows keep valid references; :func:`get_study` and
    :func:`get_series` answer :class:`NotFound` from now on. Blobs are removed after the rows
    are flushed; the caller commits.

    Raises:
        NotFound: Missing, already deleted, or another tenant's.
    """
    study = get_study(session, tenant_id, study_id)
    series_ids = select(Series.id).where(Series.study_id == study.id)
    session.execute(delete(Instance).where(Instance.series_id.in_(series_ids)))
    study.deleted_at = now()
    session.flush()
    blobs.delete_study(study.id)
    log.info("study %s of tenant %s deleted", study.id, tenant_id)


def series_input_path(session: Session, blobs: BlobStore, series: Series) -> Path:
    """Where :func:`service.io.read_any.read_volume` reads a series from.

    Returns:
        The folder of the series' DICOM files (or of a sinogram bundle's JSON and data), or the
        NIfTI file itself. For a series with
        ``uid_derived`` the DICOM files may carry an empty StudyInstanceUID: read them with
        ``allow_missing_study_uid=True``.

    Raises:
        NotFound: The series has no stored instance (its study was deleted).
    """
    key = session.scalars(
        select(Instance.blob_key).where(Instance.series_id == series.id).limit(1)
    ).first()
    if key is None:
        raise NotFound(f"series {series.id} has no stored instances")
    if series.kind == "nifti":
        return blobs.path_of(key)
    return blobs.series_dir(series.study_id, series.id)
