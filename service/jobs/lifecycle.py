"""The job state machine in the store: claim, heartbeat, progress and finish of one attempt.

States: ``queued -> running -> succeeded | failed | cancelled``. Every transition is a
conditional ``UPDATE ... WHERE`` on the current state and, for a running job, on its
``run_token``: the token names the one attempt that owns the job, so only that attempt can
report progress or finish it. A worker that lost its job (the reaper gave it to another attempt
after its heartbeat went stale) finds that out at its next heartbeat and stops without writing
anything visible. This is what makes "a worker killed mid-job leads to exactly one completed run
with one set of outputs" hold: outputs of an attempt live in its own folder and become the job's
outputs only in the same transaction that marks the job succeeded.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

from sqlalchemy import CursorResult, Update, select, update
from sqlalchemy.orm import Session

from models.registry import all_specs
from service.settings import Settings
from service.store.db import session_scope
from service.store.tables import Job, new_id, now

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
"""The states of a job, in lifecycle order."""
STATES: tuple[str, ...] = get_args(JobState)
TERMINAL = ("succeeded", "failed", "cancelled")
_CLAIM_CANDIDATES = 20
_MAX_MESSAGES = 50


def apply_update(session: Session, statement: Update) -> int:
    """Execute a conditional ``UPDATE`` and return how many rows it changed (0 = lost race)."""
    result = session.execute(statement.execution_options(synchronize_session=False))
    return int(cast(CursorResult[Any], result).rowcount)


def worker_name() -> str:
    """``host:pid`` of this process, recorded on the job it runs (no user data)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Claim:
    """A job won by one attempt.

    Attributes:
        job_id: The job.
        token: This attempt's ``run_token``.
        tenant_id: Owner of the job.
        series_id: Input series.
        pipeline: Registry name.
        params: Raw parameters as submitted (validated again by the runner).
        attempt: 1 for the first run, 2 for the retry after a lost worker, ...
        inputs: Extra inputs of the pipeline: input name -> series id (the main input is
            ``series_id``).
    """

    job_id: str
    token: str
    tenant_id: str
    series_id: str
    pipeline: str
    params: dict[str, Any]
    attempt: int
    inputs: dict[str, str] = field(default_factory=dict)


def _claimable_pipelines(queue: str, time_limit_s: int) -> list[str]:
    return [s.name for s in all_specs() if s.queue == queue and s.time_limit_s <= time_limit_s]


def claim(settings: Settings, hint_job_id: str) -> Claim | None:
    """Claim the most urgent queued job of the hinted job's queue.

    The message's job id only names the queue and the time limit the message was sent with;
    the job actually run is the queued one with the highest priority (then the oldest) among
    pipelines of that queue whose time limit fits. Returns ``None`` when nothing is queued
    (a duplicate or late message).
    """
    url = settings.resolved_database_url
    with session_scope(url) as session:
        hint = session.get(Job, hint_job_id)
        if hint is None:
            log.warning("message for unknown job %s ignored", hint_job_id)
            return None
        spec_limit = next((s.time_limit_s for s in all_specs() if s.name == hint.pipeline), 0)
        names = _claimable_pipelines(hint.queue, spec_limit)
        queue = hint.queue
    for _ in range(_MAX_MESSAGES):
        with session_scope(url) as session:
            candidates = session.scalars(
                select(Job.id)
                .where(Job.state == "queued", Job.queue == queue, Job.pipeline.in_(names))
                .order_by(Job.priority.desc(), Job.created_at.asc(), Job.id.asc())
                .limit(_CLAIM_CANDIDATES)
            ).all()
            if not candidates:
                return None
            token = new_id()
            t = now()
            for job_id in candidates:
                won = apply_update(
                    session,
                    update(Job)
                    .where(Job.id == job_id, Job.state == "queued")
                    .values(
                        state="running",
                        run_token=token,
                        attempts=Job.attempts + 1,
                        started_at=t,
                        heartbeat_at=t,
                        worker=worker_name(),
                        progress=0.0,
                        step="starting",
                    ),
                )
                if won == 1:
                    job = session.get(Job, job_id, populate_existing=True)
                    assert job is not None
                    return Claim(
                        job_id=job.id,
                        token=token,
                        tenant_id=job.tenant_id,
                        series_id=job.series_id,
                        pipeline=job.pipeline,
                        params=dict(job.params),
                        attempt=job.attempts,
                        inputs=dict(job.inputs or {}),
                    )
    return None


@dataclass
class Liveness:
    """What the owner of a running job learns at a heartbeat.

    Attributes:
        owned: The attempt still owns the job.
        cancel_requested: A user asked to cancel it.
    """

    owned: bool
    cancel_requested: bool


def heartbeat(
    settings: Settings, claim: Claim, progress: float | None = None, step: str | None = None
) -> Liveness:
    """Record that the attempt is alive (and optionally its progress)."""
    values: dict[str, Any] = {"heartbeat_at": now()}
    if progress is not None:
        values["progress"] = min(max(float(progress), 0.0), 1.0)
    if step is not None:
        values["step"] = step[:128]
    with session_scope(settings.resolved_database_url) as session:
        owned = apply_update(
            session,
            update(Job)
            .where(Job.id == claim.job_id, Job.run_token == claim.token, Job.state == "running")
            .values(**values),
        )
        cancel = session.scalar(select(Job.cancel_requested).where(Job.id == claim.job_id))
    return Liveness(owned=owned == 1, cancel_requested=bool(cancel))


def finish(
    settings: Settings,
    claim: Claim,
    state: str,
    *,
    outputs: dict[str, Any] | None = None,
    measurements: dict[str, Any] | None = None,
    error_code: str = "",
    error: str = "",
    message: str | None = None,
) -> bool:
    """Move the claimed job to a terminal ``state`` if this attempt still owns it.

    Returns:
        True if this attempt finished the job; False if it had lost it (its outputs must then
        be discarded by the caller).
    """
    if state not in TERMINAL:
        raise ValueError(f"not a terminal state: {state}")
    t = now()
    values: dict[str, Any] = {
        "state": state,
        "finished_at": t,
        "error_code": error_code,
        "error": error[:4000],
    }
    if state == "succeeded":
        values.update(progress=1.0, step="done")
    if outputs is not None:
        values["outputs"] = outputs
    if measurements is not None:
        values["measurements"] = measurements
    with session_scope(settings.resolved_database_url) as session:
        won = apply_update(
            session,
            update(Job)
            .where(Job.id == claim.job_id, Job.run_token == claim.token, Job.state == "running")
            .values(**values),
        )
        if won != 1:
            return False
        if message:
            add_message(session, claim.job_id, message, t)
    return True


def add_message(session: Session, job_id: str, text: str, at: float | None = None) -> None:
    """Append one human-readable message to a job's log (no patient data)."""
    job = session.get(Job, job_id)
    if job is not None:
        job.messages = [*job.messages, {"at": at or now(), "text": text[:500]}]
