"""One send of a delivery row: claim, refresh, outcome; and the reaper's pass over deliveries.

The reaper (every pass of :mod:`service.jobs.reaper`) moves ``waiting`` rows of finished jobs
on, takes back ``sending`` rows whose claim went stale (a worker lost mid-send), and re-publishes
pending rows whose time has passed by a grace period without a claim (a lost message).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.delivery.rows import audit_delivery, backoff_s, publish, resolve_waiting
from service.jobs.lifecycle import TERMINAL, apply_update
from service.settings import Settings
from service.store.db import session_scope
from service.store.tables import Delivery, Job, new_id, now

log = logging.getLogger(__name__)

# A pending row still unclaimed this long after it was due lost its message (broker restart, a
# crash between commit and publish) or waits behind a busy io queue: it is published again, at
# most once per this period (a duplicate message claims nothing).
REPUBLISH_GRACE_S = 120.0
_BATCH = 500


def claim_timeout_s(settings: Settings) -> float:
    """Age of a claim after which a ``sending`` row is taken as lost.

    The sender refreshes its claim at least every :data:`TOUCH_INTERVAL_S` while it works.
    """
    return 2 * settings.dimse_timeout_s + 60.0


TOUCH_INTERVAL_S = 5.0


@dataclass(frozen=True)
class DeliveryClaim:
    """A delivery row won by one attempt.

    Attributes:
        delivery_id: The row.
        token: This attempt's ``run_token``.
        tenant_id: Owner.
        job_id: The job whose outputs are sent.
        node: Destination node name.
        attempt: 1 for the first send, 2 for the first retry, ...
    """

    delivery_id: str
    token: str
    tenant_id: str
    job_id: str
    node: str
    attempt: int


def claim(settings: Settings, delivery_id: str) -> DeliveryClaim | None:
    """Claim a due pending row for one send; ``None`` when it is not (duplicate/early message)."""
    token, t = new_id(), now()
    with session_scope(settings.resolved_database_url) as session:
        won = apply_update(
            session,
            update(Delivery)
            .where(
                Delivery.id == delivery_id,
                Delivery.state == "pending",
                (Delivery.next_attempt_at.is_(None)) | (Delivery.next_attempt_at <= t + 1.0),
            )
            .values(state="sending", run_token=token, claimed_at=t, attempts=Delivery.attempts + 1),
        )
        if won != 1:
            return None
        row = session.get(Delivery, delivery_id, populate_existing=True)
        assert row is not None
        return DeliveryClaim(row.id, token, row.tenant_id, row.job_id, row.node, row.attempts)


def touch(settings: Settings, held: DeliveryClaim) -> bool:
    """Refresh the claim of a send in progress; False when the attempt lost the row."""
    with session_scope(settings.resolved_database_url) as session:
        owned = (Delivery.id == held.delivery_id, Delivery.run_token == held.token)
        return (
            apply_update(
                session,
                update(Delivery)
                .where(*owned, Delivery.state == "sending")
                .values(claimed_at=now()),
            )
            == 1
        )


def succeed(
    settings: Settings, held: DeliveryClaim, transport: str, sent: int, detail: dict[str, Any]
) -> bool:
    """Mark the claimed row delivered (if this attempt still owns it)."""
    with session_scope(settings.resolved_database_url) as session:
        owned = (Delivery.id == held.delivery_id, Delivery.run_token == held.token)
        won = apply_update(
            session,
            update(Delivery)
            .where(*owned, Delivery.state == "sending")
            .values(
                state="delivered",
                transport=transport,
                instances_sent=sent,
                delivered_at=now(),
                error="",
                detail=detail,
                next_attempt_at=None,
            ),
        )
        row = session.get(Delivery, held.delivery_id)
        if won == 1 and row is not None:
            audit_delivery(
                session, row, "delivered", transport=transport, instances=sent, attempt=held.attempt
            )
    return won == 1


def fail_attempt(
    settings: Settings,
    held: DeliveryClaim,
    transport: str,
    error: str,
    *,
    retry: bool,
    sent: int = 0,
    detail: dict[str, Any] | None = None,
) -> str | None:
    """Record a failed send: schedule a retry, or fail the row when attempts are spent.

    Returns:
        The row's new state (``pending`` or ``failed``), or None when the attempt had lost it.
    """
    retry = retry and held.attempt < settings.delivery_max_attempts
    values: dict[str, Any] = {
        "error": error[:4000],
        "instances_sent": sent,
        "detail": detail or {},
        "run_token": "",
    }
    if transport:
        values["transport"] = transport
    if retry:
        values.update(state="pending", next_attempt_at=now() + backoff_s(settings, held.attempt))
    else:
        values.update(state="failed", next_attempt_at=None)
    with session_scope(settings.resolved_database_url) as session:
        owned = (Delivery.id == held.delivery_id, Delivery.run_token == held.token)
        won = apply_update(
            session, update(Delivery).where(*owned, Delivery.state == "sending").values(**values)
        )
        row = session.get(Delivery, held.delivery_id)
        if won != 1 or row is None:
            return None
        outcome = "retry" if retry else "failed"
        audit_delivery(
            session, row, outcome, transport=transport, attempt=held.attempt, instances=sent
        )
    if retry:
        publish(settings, [held.delivery_id], backoff_s(settings, held.attempt))
    return str(values["state"])


def _take_back_stale(session: Session, settings: Settings) -> list[str]:
    cutoff = now() - claim_timeout_s(settings)
    stale = session.execute(
        select(Delivery.id, Delivery.run_token, Delivery.attempts)
        .where(Delivery.state == "sending", Delivery.claimed_at < cutoff)
        .limit(_BATCH)
    ).all()
    again = []
    for delivery_id, token, attempts in stale:
        spent = attempts >= settings.delivery_max_attempts
        values: dict[str, Any] = {"run_token": "", "error": "the sender was lost mid-send"}
        values.update(
            {"state": "failed", "next_attempt_at": None}
            if spent
            else {"state": "pending", "next_attempt_at": now()}
        )
        where = (
            Delivery.id == delivery_id,
            Delivery.run_token == token,
            Delivery.state == "sending",
        )
        if apply_update(session, update(Delivery).where(*where).values(**values)) == 1:
            log.warning("delivery %s: sender lost during attempt %d", delivery_id, attempts)
            if not spent:
                again.append(delivery_id)
    return again


def reap(settings: Settings) -> list[str]:
    """One reaper pass over deliveries (see the module docstring); publishes what is due.

    Returns:
        Ids of the rows published.
    """
    due_before = now() - REPUBLISH_GRACE_S
    with session_scope(settings.resolved_database_url) as session:
        finished = session.scalars(
            select(Job.id)
            .join(Delivery, Delivery.job_id == Job.id)
            .where(Delivery.state == "waiting", Job.state.in_(TERMINAL))
            .distinct()
            .limit(_BATCH)
        ).all()
        jobs = [job for job_id in finished if (job := session.get(Job, job_id)) is not None]
        ids = [rid for job in jobs for rid in resolve_waiting(session, job)]
        ids += _take_back_stale(session, settings)
        overdue = session.scalars(
            select(Delivery.id)
            .where(Delivery.state == "pending", Delivery.next_attempt_at < due_before)
            .limit(_BATCH)
        ).all()
        if overdue:  # re-sent now; sent again only if still unclaimed a grace period later
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_(overdue), Delivery.state == "pending")
                .values(next_attempt_at=now())
                .execution_options(synchronize_session=False)
            )
        ids += overdue
    ids = list(dict.fromkeys(ids))
    if ids:
        log.info("re-publishing %d due delivery(ies)", len(ids))
    publish(settings, ids)
    return ids
