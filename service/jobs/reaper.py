"""The reaper: gives lost jobs back to the queue, or fails them once their attempts are spent.

Two kinds of loss, both decided from the job rows (the source of truth):

* a **lost worker**: a running job whose heartbeat is older than ``heartbeat_timeout_s``. It
  is queued again while ``attempts < max_attempts`` (a killed worker's job runs exactly once
  more), else failed with ``worker_lost``. A job whose cancellation was requested is cancelled;
  one whose attempt has outlived the pipeline's hard time limit (Celery killed it) is failed
  with ``time_limit`` rather than run again.
* a **lost message**: a queued job whose doorbell was published under an older broker epoch
  (Redis restarted without persistence), or never published (the gateway died between the
  commit and the publish). Its doorbell is sent again.

Every worker and the gateway run the reaper periodically; all updates are conditional, so
several reapers at once do no harm, and a duplicate doorbell is a no-op for the claim.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import or_, select, update

from models.registry import all_specs
from service.delivery import attempts as deliveries
from service.jobs.lifecycle import add_message, apply_update
from service.jobs.queue import Doorbell, broker_epoch, send_doorbell, time_limits
from service.settings import Settings
from service.store.db import session_scope
from service.store.tables import Job, now

log = logging.getLogger(__name__)

_PUBLISH_GRACE_S = 10.0
_BATCH = 500


@dataclass
class ReapReport:
    """What one reaper pass did (job ids)."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)
    deliveries: list[str] = field(default_factory=list)  # delivery ids published


def _hard_limit_s(settings: Settings, pipeline: str) -> float | None:
    spec = next((s for s in all_specs() if s.name == pipeline), None)
    return None if spec is None else float(time_limits(spec, settings)[1])


def _verdict(
    settings: Settings, attempts: int, cancel: bool, pipeline: str, started_at: float | None
) -> tuple[str, dict[str, Any], str]:
    """What becomes of a running job whose heartbeat went stale: (report list, values, text)."""
    hard = _hard_limit_s(settings, pipeline)
    if cancel:
        values = {"state": "cancelled", "run_token": ""}
        return "cancelled", values, "cancelled (its worker was lost)"
    if hard is not None and started_at is not None and now() - started_at > hard:
        # Celery's hard time limit killed the attempt: running it again would only repeat that.
        error = f"{pipeline} exceeded its hard time limit of {hard:.0f} s"
        values = {"state": "failed", "error_code": "time_limit", "error": error}
        return "failed", values, f"attempt {attempts} killed at the hard time limit; failed"
    if attempts < settings.max_attempts:
        values = {"state": "queued", "run_token": "", "worker": "", "step": "re-queued"}
        return "requeued", values, f"worker lost during attempt {attempts}; queued again"
    error = f"the worker was lost during attempt {attempts} of {settings.max_attempts}"
    values = {"state": "failed", "error_code": "worker_lost", "error": error}
    return "failed", values, f"worker lost during attempt {attempts}; failed"


def _recover_stale(settings: Settings, report: ReapReport) -> list[Doorbell]:
    cutoff = now() - settings.heartbeat_timeout_s
    requeued: list[Doorbell] = []
    with session_scope(settings.resolved_database_url) as session:
        stale = session.execute(
            select(
                Job.id,
                Job.run_token,
                Job.attempts,
                Job.cancel_requested,
                Job.pipeline,
                Job.priority,
                Job.started_at,
            )
            .where(Job.state == "running", Job.heartbeat_at < cutoff)
            .limit(_BATCH)
        ).all()
        for job_id, token, attempts, cancel, pipeline, priority, started_at in stale:
            kind, values, text = _verdict(settings, attempts, cancel, pipeline, started_at)
            if values["state"] != "queued":
                values["finished_at"] = now()
            owned = (Job.id == job_id, Job.run_token == token, Job.state == "running")
            if apply_update(session, update(Job).where(*owned).values(**values)) != 1:
                continue
            add_message(session, job_id, text)
            getattr(report, kind).append(job_id)
            log.warning("job %s: %s", job_id, text)
            if kind == "requeued":
                requeued.append(Doorbell(job_id, pipeline, priority))
    return requeued


def _unpublished(settings: Settings, epoch: str) -> list[Doorbell]:
    cutoff = now() - _PUBLISH_GRACE_S
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(
            select(Job.id, Job.pipeline, Job.priority)
            .where(
                Job.state == "queued",
                Job.broker_epoch != epoch,
                or_(Job.enqueued_at.is_(None), Job.enqueued_at < cutoff),
                Job.created_at < cutoff,
            )
            .limit(_BATCH)
        ).all()
    return [Doorbell(*row) for row in rows]


def publish(settings: Settings, bells: Sequence[Doorbell], epoch: str | None = None) -> None:
    """Send the doorbell of each (committed) queued job and record the broker epoch it went to.

    Args:
        settings: Broker and database.
        bells: The jobs to announce.
        epoch: The broker epoch if the caller just read it (read here otherwise).
    """
    if not bells:
        return
    epoch = epoch or broker_epoch(settings)
    for bell in bells:
        send_doorbell(settings, bell)
    with session_scope(settings.resolved_database_url) as session:
        apply_update(
            session,
            update(Job)
            .where(Job.id.in_([bell.job_id for bell in bells]))
            .values(broker_epoch=epoch, enqueued_at=now()),
        )


def reap(settings: Settings) -> ReapReport:
    """Run one reaper pass (see the module docstring)."""
    report = ReapReport()
    requeued = _recover_stale(settings, report)
    epoch = broker_epoch(settings)
    lost = [b for b in _unpublished(settings, epoch) if b.job_id not in report.requeued]
    report.republished = [b.job_id for b in lost]
    if lost:
        log.warning("re-publishing %d queued job(s) lost by the broker", len(lost))
    publish(settings, requeued + lost, epoch)
    report.deliveries = deliveries.reap(settings)
    return report


class Reaper(threading.Thread):
    """Daemon thread running :func:`reap` every ``reaper_interval_s`` until stopped."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="voxelgate-reaper", daemon=True)
        self.settings = settings
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Loop until :meth:`stop`; a failed pass is logged and retried next period."""
        while not self._stop_event.wait(self.settings.reaper_interval_s):
            try:
                reap(self.settings)
            except Exception:  # the loop must survive a broker or DB outage; log and go on
                log.exception(
                    "reaper pass failed; retrying in %.0f s", self.settings.reaper_interval_s
                )

    def stop(self) -> None:
        """Ask the loop to end after the current pass."""
        self._stop_event.set()
