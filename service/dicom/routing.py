"""Routing: queue the pipelines whose rules match newly received series.

Called once a received study is stored (C-STORE after its stable age, or a STOW-RS request).
Rules are data (:class:`service.dicom.config.RoutingRule`); every pattern given must match in
full (case-insensitive); all matching rules fire, each once per series that got new instances in
this arrival. A rule whose pipeline refuses the series (modality) is skipped with an audit
event, never an exception: one bad rule must not stop the others or lose the received study.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select

from models.errors import VoxelgateError
from service.dicom.config import DicomConfig, RoutingRule
from service.jobs.submit import submit_jobs
from service.settings import Settings
from service.store import audit
from service.store.db import session_scope
from service.store.tables import Series

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arrival:
    """How instances arrived.

    Attributes:
        source: ``"dimse"`` (C-STORE to our listener) or ``"stow"`` (STOW-RS to the gateway).
        calling_ae: The sender's AE title (DIMSE; ``""`` for STOW-RS).
        called_ae: The AE title the sender called (DIMSE; ``""`` for STOW-RS).
    """

    source: Literal["dimse", "stow"]
    calling_ae: str = ""
    called_ae: str = ""


@dataclass(frozen=True)
class SeriesFacts:
    """The attributes of a series that rules look at."""

    series_id: str
    modality: str
    description: str
    body_part: str


@dataclass(frozen=True)
class Routed:
    """One job queued by one rule."""

    rule: str
    series_id: str
    job_id: str


def _matches(pattern: str | None, value: str) -> bool:
    return pattern is None or re.fullmatch(pattern, value.strip(), re.IGNORECASE) is not None


def rule_matches(rule: RoutingRule, arrival: Arrival, series: SeriesFacts) -> bool:
    """Whether ``rule`` applies to ``series`` arriving by ``arrival``."""
    if arrival.source not in rule.source:
        return False
    return (
        _matches(rule.calling_ae, arrival.calling_ae)
        and _matches(rule.called_ae, arrival.called_ae)
        and _matches(rule.modality, series.modality)
        and _matches(rule.series_description, series.description)
        and _matches(rule.body_part, series.body_part)
    )


def _facts(settings: Settings, series_ids: Sequence[str]) -> list[SeriesFacts]:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.scalars(select(Series).where(Series.id.in_(list(series_ids)))).all()
        by_id = {
            r.id: SeriesFacts(r.id, r.modality, r.description, r.body_part or "") for r in rows
        }
    return [by_id[sid] for sid in series_ids if sid in by_id]


def _audit(settings: Settings, tenant_id: str, action: str, series_id: str, **detail: str) -> None:
    with session_scope(settings.resolved_database_url) as session:
        audit.record(
            session,
            tenant_id=tenant_id,
            key_id="",
            action=action,
            resource="series",
            resource_id=series_id,
            detail=dict(detail),
        )


def route_series(
    settings: Settings,
    config: DicomConfig,
    tenant_id: str,
    series_ids: Sequence[str],
    arrival: Arrival,
) -> list[Routed]:
    """Queue the jobs of every rule that matches each of ``series_ids``.

    Args:
        settings: Service settings.
        config: The DICOM configuration holding the rules.
        tenant_id: Owner of the series.
        series_ids: Series that got new instances in this arrival (store ids).
        arrival: How they arrived.

    Returns:
        The jobs queued, in rule order per series.
    """
    routed: list[Routed] = []
    for facts in _facts(settings, series_ids):
        for rule in config.rules:
            if not rule_matches(rule, arrival, facts):
                continue
            try:
                job_ids = submit_jobs(
                    settings,
                    tenant_id,
                    rule.pipeline,
                    rule.params,
                    series_ids=[facts.series_id],
                    priority=rule.priority,
                    destinations=rule.destinations,
                )
            except VoxelgateError as exc:
                log.warning(
                    "routing: rule %s skipped series %s: %s", rule.name, facts.series_id, exc
                )
                _audit(
                    settings,
                    tenant_id,
                    "route_skip",
                    facts.series_id,
                    rule=rule.name,
                    reason=str(exc)[:500],
                )
                continue
            log.info("routing: rule %s queued job %s", rule.name, job_ids[0])
            _audit(
                settings,
                tenant_id,
                "route",
                facts.series_id,
                rule=rule.name,
                job_id=job_ids[0],
                pipeline=rule.pipeline,
            )
            routed.append(Routed(rule.name, facts.series_id, job_ids[0]))
    return routed
