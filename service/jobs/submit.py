"""Job submission: validate against the registry, persist, then enqueue after the commit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from models.errors import InputRejected, InvalidParameters
from models.registry import PipelineSpec, get_spec, validate_params
from service.delivery.rows import add_rows_for_jobs as add_delivery_rows
from service.errors import NotFound
from service.jobs.inputs import check_extra_modality, check_extra_names
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


@dataclass(frozen=True)
class Target:
    """What one job runs on: a series or the fitting series of a study, and its extra inputs.

    Attributes:
        series_id: The main input series (or ``None`` with ``study_id``).
        study_id: A study whose one series that fits the pipeline is the main input.
        inputs: Extra inputs by name: ``{input name: series id}`` (:mod:`service.jobs.inputs`).
    """

    series_id: str | None = None
    study_id: str | None = None
    inputs: Mapping[str, str] = field(default_factory=dict)


def check_extra_series(spec: PipelineSpec, inputs: Mapping[str, Series]) -> None:
    """Refuse extra inputs the pipeline does not take: name, required ones, kind, modality."""
    for item in check_extra_names(spec, inputs):
        series = inputs[item.name]
        if series.kind == "sinogram":
            raise InputRejected(
                f"{spec.name} input {item.name!r} takes images; series {series.id} is a "
                "sinogram bundle (projection data)"
            )
        check_extra_modality(spec, item, series.modality, f"series {series.id}")


def resolve_inputs(
    session: Session, tenant_id: str, spec: PipelineSpec, inputs: Mapping[str, str]
) -> dict[str, Series]:
    """The tenant's series of each extra input, checked against the pipeline.

    Raises:
        InvalidParameters: Unknown input name (did-you-mean), or a required one missing.
        NotFound: A series that does not exist for this tenant (the message names the input).
        InputRejected: A sinogram bundle, or a modality the input does not accept.
    """
    check_extra_names(spec, inputs)  # names first: a typo is reported before any lookup
    rows = {}
    for name, series_id in inputs.items():
        try:
            rows[name] = get_series(session, tenant_id, series_id)
        except NotFound as exc:
            raise NotFound(f"input {name!r}: {exc}") from None
    check_extra_series(spec, rows)
    return rows


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
    inputs: Mapping[str, Series] | None = None,
) -> Job:
    """Insert one queued job row (not yet published).

    ``destinations`` are configured DICOM node names its DICOM outputs go to once it succeeds;
    ``inputs`` the pipeline's extra inputs by name (every required one must be there).
    """
    check_input(spec, series)
    extras = dict(inputs or {})
    check_extra_series(spec, extras)
    job = Job(
        tenant_id=tenant_id,
        cohort_id=cohort_id,
        series_id=series.id,
        inputs={name: row.id for name, row in extras.items()},
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
    targets: Sequence[Target],
    priority: int,
    cohort_id: str | None,
    destinations: Sequence[str] = (),
) -> list[Doorbell]:
    if not targets:
        raise InvalidParameters("give a series_id or a study_id (or lists of them)")
    resolved = []
    for target in targets:
        if target.series_id is not None:
            series = get_series(session, tenant_id, target.series_id)
        else:
            assert target.study_id is not None
            series = series_of_study(session, tenant_id, target.study_id, spec)
        resolved.append((series, resolve_inputs(session, tenant_id, spec, target.inputs)))
    return [
        Doorbell(
            add_job(
                session,
                tenant_id,
                series,
                spec,
                params,
                priority,
                cohort_id,
                None,
                destinations,
                inputs,
            ).id,
            spec.name,
            priority,
        )
        for series, inputs in resolved
    ]


def _targets(
    series_ids: Sequence[str], study_ids: Sequence[str], inputs: Mapping[str, str]
) -> list[Target]:
    return [Target(series_id=s, inputs=inputs) for s in series_ids] + [
        Target(study_id=s, inputs=inputs) for s in study_ids
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
    inputs: Mapping[str, str] | None = None,
) -> list[str]:
    """Create one job per series (or per study's fitting series) and enqueue them.

    Everything is validated before anything is written: an unknown pipeline, bad parameters,
    an unknown or deleted series/study, a modality mismatch or a bad extra input refuses the
    whole submission. ``destinations`` (configured DICOM node names) receive each job's DICOM
    outputs once it succeeds; the caller checks that they exist. ``inputs`` are the pipeline's
    extra inputs (``{input name: series id}``), the same for every job.

    Returns:
        The new job ids, in the order of the targets.
    """
    spec, full = _checked(pipeline, params, priority)
    targets = _targets(series_ids, study_ids, inputs or {})
    with session_scope(settings.resolved_database_url) as session:
        bells = _create_jobs(session, tenant_id, spec, full, targets, priority, None, destinations)
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
    targets: Sequence[Target] = (),
) -> str:
    """Create a cohort and its jobs in one transaction (all or nothing), then enqueue them.

    The members are ``series_ids`` and ``study_ids`` (no extra inputs), then ``targets`` (each
    with its own extra inputs, e.g. each patient's planning CT).

    Returns:
        The cohort id.
    """
    spec, full = _checked(pipeline, params, priority)
    members = [*_targets(series_ids, study_ids, {}), *targets]
    with session_scope(settings.resolved_database_url) as session:
        cohort = Cohort(tenant_id=tenant_id, pipeline=spec.name, params=full)
        session.add(cohort)
        session.flush()
        cohort_id = cohort.id
        bells = _create_jobs(session, tenant_id, spec, full, members, priority, cohort_id)
    publish(settings, bells)
    return cohort_id
