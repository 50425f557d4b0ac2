"""Database tables of the job store (SQLAlchemy 2; SQLite and PostgreSQL).

Times are UTC seconds since the epoch (float), identical on both back ends. Identifiers are
random hex strings. Patient identity is kept only as a salted hash (``patient_key``), used to
refuse uploads that mix patients; names and IDs themselves are never stored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id() -> str:
    """Return a new random identifier (32 hex characters)."""
    return uuid.uuid4().hex


def now() -> float:
    """Return the current UTC time, seconds since the epoch."""
    return time.time()


class Base(DeclarativeBase):
    """Declarative base of every table."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    """An organisation; every study, job and cohort belongs to exactly one."""

    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class ApiKey(Base):
    """An API key: ``vg_<id>_<secret>``; only the sha256 of the secret is stored."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[float] = mapped_column(Float, default=now)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Study(Base):
    """A DICOM study (or a NIfTI upload wrapped as one).

    ``uid_derived``: the StudyInstanceUID was empty in the files and was derived from stable
    header fields (:func:`service.ingest.scan.derive_uid`); the stored files keep the empty UID.
    """

    __tablename__ = "studies"
    __table_args__ = (UniqueConstraint("tenant_id", "study_instance_uid"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    patient_key: Mapped[str] = mapped_column(String(64), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    source: Mapped[str] = mapped_column(String(16), default="upload")
    uid_derived: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[float] = mapped_column(Float, default=now)
    deleted_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Series(Base):
    """A series of a study: DICOM instances, or one NIfTI volume.

    ``geometry``: header-only summary (:mod:`service.ingest.geometry`). ``uid_derived``: some UID
    of the series (study, series or instance) was empty and derived; NIfTI series always.
    """

    __tablename__ = "series"
    __table_args__ = (UniqueConstraint("study_id", "series_instance_uid"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))  # "dicom" | "nifti" | "sinogram"
    modality: Mapped[str] = mapped_column(String(16), default="")
    description: Mapped[str] = mapped_column(String(64), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="", server_default="")
    geometry: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    uid_derived: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Instance(Base):
    """One stored file of a series (a DICOM instance or the NIfTI file)."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("series_id", "sop_instance_uid"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_id: Mapped[str] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    blob_key: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Cohort(Base):
    """A batch of jobs submitted together."""

    __tablename__ = "cohorts"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    # A cohort defined by a PACS query (empty for a list of series/studies): the node asked, the
    # query as data, and the state of fetching its studies ("" | queued | fetching | done |
    # failed), with the error of a failed fetch and the priority/destinations its jobs get.
    source_node: Mapped[str] = mapped_column(String(64), default="", server_default="")
    source_query: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    fetch_state: Mapped[str] = mapped_column(String(16), default="", server_default="")
    fetch_error: Mapped[str] = mapped_column(Text, default="", server_default="")
    fetch_detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Job(Base):
    """One pipeline run on one series; the source of truth for its state.

    ``state``: queued -> running -> succeeded | failed | cancelled. ``run_token`` names the
    attempt that owns the job; only that attempt may finish it. ``series_id`` is the main input;
    ``inputs`` the pipeline's extra inputs, ``{input name: series id}`` (e.g. a reference CT).
    """

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_queue", "state", "queue"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    cohort_id: Mapped[str | None] = mapped_column(
        ForeignKey("cohorts.id"), nullable=True, index=True
    )
    series_id: Mapped[str] = mapped_column(ForeignKey("series.id"), index=True)
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    retry_of: Mapped[str | None] = mapped_column(String(32), nullable=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    pipeline_version: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    priority: Mapped[int] = mapped_column(Integer, default=5)
    queue: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[str] = mapped_column(String(128), default="")
    messages: Mapped[list[Any]] = mapped_column(JSON, default=list)
    error_code: Mapped[str] = mapped_column(String(32), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_token: Mapped[str] = mapped_column(String(32), default="")
    worker: Mapped[str] = mapped_column(String(128), default="")
    broker_epoch: Mapped[str] = mapped_column(String(32), default="")
    outputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    measurements: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    deliver_to: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    enqueued_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class AuditEvent(Base):
    """Who did what to which resource (ids only, never patient data)."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, default=now, index=True)
    tenant_id: Mapped[str] = mapped_column(String(32), index=True)
    key_id: Mapped[str] = mapped_column(String(16), default="")
    action: Mapped[str] = mapped_column(String(32))
    resource: Mapped[str] = mapped_column(String(16))
    resource_id: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Delivery(Base):
    """Sending one job's DICOM outputs to one configured node; the source of truth of its state.

    One row per (job, node): pushing again to the same node reuses the row (idempotent). States:
    ``waiting`` (job not finished yet), ``pending`` (due at ``next_attempt_at``), ``sending``
    (claimed by ``run_token``), ``delivered``, ``failed`` (attempts spent or job did not succeed).
    """

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("job_id", "node"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    node: Mapped[str] = mapped_column(String(64))
    transport: Mapped[str] = mapped_column(String(16))  # "dimse" | "dicomweb"
    state: Mapped[str] = mapped_column(String(16), default="waiting", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    run_token: Mapped[str] = mapped_column(String(32), default="")
    claimed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    instances_sent: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
