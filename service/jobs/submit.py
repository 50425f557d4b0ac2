"""Job submission: validate against the registry, persist, then enqueue after the commit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Session

from models.errors import InputRejected, InvalidParameters
from models.registry import PipelineSpec, get_spec, validate_params
from service.delivery.rows import add_rows_for_jobs as add_delivery_rows
from service.jobs.queue import Doorbell
from service.jobs.reaper import publish
from service.settings import Settings
from service.store.db import session_scope
from service.store.studies import get_series, get_study
from service.store.tables import Cohort, Job, Series

PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT = 0, 9, 5


def check_priority(priority: int) -> int:
    """Return ``priority`` if it is in 0..9 (9 most urgent), else raise InvalidParameters."""
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidParameters(
            f"priority must be {PRIORITY_MIN}..{PRIORITY_MAX} (9 most urgent), got {priority}"
        )
    return priority


def accepts(spec: PipelineSpec, series: Series) -> bool:
    """Whether ``spec`` takes ``series``: its modality, or a sinogram bundle it reads."""
    if series.kind == "sinogram":
        return spec.sinogram_input is not None
    return series.modality in spec.inputs[0].modalities


def check_input(spec: PipelineSpec, series: Series) -> None:
    """Refuse a series the pipeline cannot take (modality, projection data), before queueing."""
    accepted = spec.inputs[0].modalities
    if series.kind == "sinogram" and spec.sinogram_input is None:
        raise InputRejected(
            f"{spec.name} takes images; series {series.id} is a sinogram bundle (projection data)"
        )
    if not accepts(spec, series):
        raise InputRejected(
            f"{spec.name} accepts modalities {', '.join(accepted)}; series {series.id} is "
            f"{series.modality or 'of unknown modality'}"
        )


def series_of_study(session: Session, tenant_id: str, study_id: str, spec: PipelineSpec) -> Series:
    """The one series of a study that ``spec`` accepts (refuse when none or several fit)."""
    study = get_study(session, tenant_id, study_id)
    accepted = spec.inputs[0].modalities
    fits = [
        s
        for s in session.query(Series).filter(Series.study_id == study.id).order_by(Series.id)
        if accepts(spec, s)
    ]
    if len(fits) != 1:
        listing = ", ".join(f"{s.id} ({s.modality})" for s in fits) or "none"
        raise InputRejected(
            f"study {study_id} has {len(fits)} series that {spec.name} accepts "
            f"({', '.join(accepted)}): {listing}; submit one series id instead"
        )
    return fits[0]


def add_job(
    session: Session,
    tenant_id: str,
    series: Series,
    spec: PipelineSpec,
    params: dict[str, Any],
    priority: int,
    cohort_id: str | None = None,
    retry_of: str | None = None,
    destinations: Sequence[str] = (),
) -> Job:
    """Insert one queued job row (not yet published).

    ``destinations`` are configured DICOM node names its DICOM outputs go to once it succeeds.
    """
    check_input(spec, series)
    job = Job(
        tenant_id=tenant_id,
        cohort_id=cohort_id,
        series_id=series.id,
        retry_of=retry_of,
        pipeline=spec.name,
        pipeline_version=spec.version,
        params=params,
        priority=priority,
        queue=spec.queue,
        state="queued",
        messages=[],
        outputs={},
        measurements={},
        deliver_to=list(destinations),
    )
    session.add(job)
    session.flush()
    return job


def validated_params(spec: PipelineSpec, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``raw`` and return the complete parameter set (defaults filled) as JSON."""
    return validate_params(spec, raw).model_dump(mode="json")


def _checked(
    pipeline: str, params: Mapping[str, Any], priority: int
) -> tuple[PipelineSpec, dict[str, Any]]:
    spec = get_spec(pipeline)
    full = validated_params(spec, params)
    check_priority(priority)
    return spec, full


def _create_jobs(
    session: Session,
    tenant_id: str,
    spec: PipelineSpec,
    params: dict[str, Any],
    series_ids: Sequence[str],
    study_ids: Sequence[str],
    priority: int,
    cohort_id: str | None,
    destinations: Sequence[str] = (),
) -> list[Doorbell]:
    if not series_ids and not study_ids:
        raise InvalidParameters("give a series_id or a study_id (or lists of them)")
    targets = [get_series(session, tenant_id, sid) for sid in series_ids]
    targets += [series_of_study(session, tenant_id, sid, spec) for sid in study_ids]
    return [
        Doorbell(
            add_job(
                session, tenant_id, series, spec, params, priority, cohort_id, None, destinations
            ).id,
            spec.name,
            priority,
        )
        for series in targets
    ]


def submit_jobs(
    settings: Settings,
    tenant_id: str,
    pipeline: str,
    params: Mapping[str, Any],
    *,
    series_ids: Sequence[str] = (),
    study_ids: Sequence[str] = (),
    priority: int = PRIORITY_DEFAULT,
    destinations: Sequence[str] = (),
) -> list[str]:
    """Create one job per series (or per study's fitting series) and enqueue them.

    Everything is validated before anything is written: an unknown pipeline, bad parameters,
    an unknown or deleted series/study or a modality mismatch refuses the whole submission.
    ``destinations`` (configured DICOM node names) receive each job's DICOM outputs once it
    succeeds; the caller checks that they exist.

    Returns:
        The new job ids, in the order of the targets.
    """
    spec, full = _checked(pipeline, params, priority)
    with session_scope(settings.resolved_database_url) as session:
        bells = _create_jobs(
            session, tenant_id, spec, full, series_ids, study_ids, priority, None, destinations
        )
        if destinations:  # one waiting delivery row per (job, node), resolved when it finishes
            add_delivery_rows(session, settings, [bell.job_id for bell in bells], destinations)
    publish(settings, bells)
    return [bell.job_id for bell in bells]


def submit_cohort(
    settings: Settings,
    tenant_id: str,
    pipeline: str,
    params: Mapping[str, Any],
    *,
    series_ids: Sequence[str] = (),
    study_ids: Sequence[str] = (),
    priority: int = PRIORITY_DEFAULT,
) -> str:
    """Create a cohort and its jobs in one transaction (all or nothing), then enqueue them.

    Returns:
        The cohort id.
    """
    spec, full = _checked(pipeline, params, priority)
    with session_scope(settings.resolved_database_url) as session:
        cohort = Cohort(tenant_id=tenant_id, pipeline=spec.name, params=full)
        session.add(cohort)
        session.flush()
        cohort_id = cohort.id
        bells = _create_jobs(
            session, tenant_id, spec, full, series_ids, study_ids, priority, cohort_id
        )
    publish(settings, bells)
    return cohort_id
