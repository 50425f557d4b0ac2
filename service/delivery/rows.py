"""Delivery rows: one per (job, node); creation, hand-over when the job ends, pushes, views.

States: ``waiting`` (its job has not finished) -> ``pending`` (due at ``next_attempt_at``) ->
``sending`` (claimed by one attempt's ``run_token``) -> ``delivered`` | ``pending`` again (a
retry after ``delivery_backoff_s * 2**(n-1)`` s, capped at ``delivery_backoff_max_s``) |
``failed`` (``delivery_max_attempts`` spent, a failure a resend cannot fix, or a job that did
not succeed). Like the job rows, each transition is a conditional ``UPDATE ... WHERE`` on the
current state (and token), so duplicate messages and several reapers are harmless. The
transitions of one send (claim, outcome) and the reaper pass are in
:mod:`service.delivery.attempts`.

Publishing a ``voxelgate.deliver`` message happens after the commit that made a row pending.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.dicom.config import DicomConfig, Node, load_dicom_config
from service.errors import Conflict, InvalidParameters
from service.jobs.lifecycle import TERMINAL, apply_update
from service.jobs.queue import DELIVER_TASK, send_io_task
from service.settings import Settings
from service.store import audit
from service.store.db import session_scope
from service.store.tables import Delivery, Job, new_id, now

log = logging.getLogger(__name__)


def backoff_s(settings: Settings, attempts: int) -> float:
    """Wait before the next send after ``attempts`` failed ones (10, 20, 40, ... s, capped)."""
    return min(
        settings.delivery_backoff_s * 2 ** max(attempts - 1, 0), settings.delivery_backoff_max_s
    )


def check_destination(config: DicomConfig, name: str) -> Node:
    """The configured node ``name`` if deliveries can reach it.

    Raises:
        InvalidParameters: Unknown node, or one with neither a DIMSE nor a DICOMweb service
            for its ``send_via``.
    """
    node = config.node(name)
    if node.send_via == "dimse" and not node.has_dimse:
        raise InvalidParameters(f"node {name!r} has no DIMSE service (ae_title and port)")
    if node.send_via == "dicomweb" and not node.dicomweb_url:
        raise InvalidParameters(f"node {name!r} has no dicomweb_url")
    return node


def audit_delivery(session: Session, row: Delivery, outcome: str, **detail: Any) -> None:
    """Add a ``deliver`` audit event for ``row`` (ids, node, outcome and counts only)."""
    audit.record(
        session,
        tenant_id=row.tenant_id,
        key_id=detail.pop("key_id", ""),
        action="deliver",
        resource="delivery",
        resource_id=row.id,
        detail={"job_id": row.job_id, "node": row.node, "outcome": outcome, **detail},
    )


def add_rows(
    session: Session, config: DicomConfig, job: Job, nodes: Sequence[str]
) -> list[Delivery]:
    """Insert a ``waiting`` row for each of ``nodes`` that ``job`` has none for yet.

    Returns:
        The job's rows for ``nodes`` (new and existing), in the order given.
    """
    existing = {
        row.node: row
        for row in session.scalars(select(Delivery).where(Delivery.job_id == job.id)).all()
    }
    rows = []
    for name in dict.fromkeys(nodes):
        row = existing.get(name)
        if row is None:
            node = config.node(name)
            row = Delivery(
                id=new_id(),
                tenant_id=job.tenant_id,
                job_id=job.id,
                node=name,
                transport=node.send_via,
                state="waiting",
                attempts=0,
                run_token="",
                instances_sent=0,
                error="",
                detail={},
            )
            session.add(row)
        rows.append(row)
    session.flush()
    return rows


def add_rows_for_jobs(
    session: Session, settings: Settings, job_ids: Sequence[str], nodes: Sequence[str]
) -> None:
    """At submission: a ``waiting`` row per (job, node); a failed one for an unknown node."""
    config = load_dicom_config(settings)
    for job_id in job_ids:
        job = session.get(Job, job_id)
        if job is not None:
            add_rows(session, config, job, [n for n in nodes if n in config.nodes])
            _add_unconfigured(session, job, [n for n in nodes if n not in config.nodes])


def _add_unconfigured(session: Session, job: Job, names: Sequence[str]) -> None:
    """A failed row for each destination that is no longer a configured node."""
    have = set(session.scalars(select(Delivery.node).where(Delivery.job_id == job.id)).all())
    for name in (n for n in dict.fromkeys(names) if n not in have):
        log.warning("job %s: destination %s is no longer configured", job.id, name)
        session.add(
            Delivery(
                id=new_id(),
                tenant_id=job.tenant_id,
                job_id=job.id,
                node=name[:64],
                transport="",
                state="failed",
                attempts=0,
                run_token="",
                instances_sent=0,
                error=f"node {name!r} is not configured",
                detail={},
            )
        )
    session.flush()


def resolve_waiting(session: Session, job: Job) -> list[str]:
    """Move the ``waiting`` rows of a finished job on: ``pending`` if it succeeded, else failed.

    Returns:
        Ids of the rows made pending (to publish after the commit).
    """
    if job.state not in TERMINAL:
        return []
    waiting = session.scalars(
        select(Delivery).where(Delivery.job_id == job.id, Delivery.state == "waiting")
    ).all()
    pending = []
    for row in waiting:
        if job.state == "succeeded":
            values: dict[str, Any] = {"state": "pending", "next_attempt_at": now()}
        else:
            values = {"state": "failed", "error": f"the job {job.state}; nothing to deliver"}
        where = (Delivery.id == row.id, Delivery.state == "waiting")
        if apply_update(session, update(Delivery).where(*where).values(**values)) != 1:
            continue
        if values["state"] == "pending":
            pending.append(row.id)
        else:
            audit_delivery(session, row, "failed", reason=f"job {job.state}")
    return pending


def publish(
    settings: Settings, delivery_ids: Sequence[str], countdown_s: float | None = None
) -> None:
    """Send one ``voxelgate.deliver`` message per (committed) pending row."""
    for delivery_id in delivery_ids:
        send_io_task(settings, DELIVER_TASK, delivery_id, countdown_s)


def after_job(settings: Settings, config: DicomConfig, job_id: str) -> list[str]:
    """Hook for a finished job: create rows for its ``deliver_to`` nodes, resolve, publish.

    Unknown node names (the configuration changed since submission) give failed rows.

    Returns:
        Ids of the rows published.
    """
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        if job is None or job.state not in TERMINAL:
            return []
        add_rows(session, config, job, [n for n in job.deliver_to if n in config.nodes])
        _add_unconfigured(session, job, [n for n in job.deliver_to if n not in config.nodes])
        pending = resolve_waiting(session, job)
    publish(settings, pending)
    return pending


@dataclass(frozen=True)
class PushResult:
    """What a manual push did to one node's row.

    Attributes:
        node: The node.
        delivery_id: Its row.
        action: ``queued`` (pending and published), ``waiting`` (the job is not finished),
            ``unchanged`` (already delivered, or in progress).
    """

    node: str
    delivery_id: str
    action: str


def push(
    settings: Settings,
    config: DicomConfig,
    job: Job,
    session: Session,
    nodes: Sequence[str],
    *,
    force: bool = False,
    key_id: str = "",
) -> tuple[list[PushResult], list[str]]:
    """Ask for ``job``'s DICOM outputs to be delivered to ``nodes`` (idempotent per node).

    A delivered row is sent again only with ``force``; a failed one is retried from scratch
    (attempts reset); a waiting, pending or sending one is left as it is.

    Returns:
        The result per node, and the row ids to publish once the caller has committed.

    Raises:
        InvalidParameters: Unknown node, node without the service its ``send_via`` needs, or no
            node given.
        Conflict: The job failed or was cancelled (nothing to deliver).
    """
    if not nodes:
        raise InvalidParameters("give at least one node name")
    for name in nodes:
        check_destination(config, name)
    if job.state in ("failed", "cancelled"):
        raise Conflict(f"job {job.id} {job.state}; it has no outputs to deliver")
    results, to_publish = [], []
    for row in add_rows(session, config, job, nodes):
        action = "unchanged"
        restart = row.state == "failed" or (force and row.state == "delivered")
        if restart or (row.state == "waiting" and job.state == "succeeded"):
            state = "pending" if job.state == "succeeded" else "waiting"
            where = (Delivery.id == row.id, Delivery.state == row.state)
            values = {"state": state, "next_attempt_at": now(), "error": ""}
            if restart:
                values.update(attempts=0, transport=config.node(row.node).send_via)
            if apply_update(session, update(Delivery).where(*where).values(**values)) == 1:
                action = "queued" if state == "pending" else "waiting"
                if state == "pending":
                    to_publish.append(row.id)
        elif row.state == "waiting":
            action = "waiting"
        audit_delivery(session, row, f"push_{action}", force=force, key_id=key_id)
        results.append(PushResult(row.node, row.id, action))
    return results, to_publish


def delivery_views(session: Session, job_id: str) -> list[dict[str, Any]]:
    """The JSON view of a job's deliveries, by node name."""
    rows = session.scalars(
        select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.node)
    ).all()
    return [
        {
            "id": row.id,
            "node": row.node,
            "transport": row.transport,
            "state": row.state,
            "attempts": row.attempts,
            "instances_sent": row.instances_sent,
            "error": row.error or None,
            "next_attempt_at": row.next_attempt_at if row.state == "pending" else None,
            "delivered_at": row.delivered_at,
        }
        for row in rows
    ]
