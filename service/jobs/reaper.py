"""The reaper: gives lost jobs back to the queue, or fails them once their attempts are spent.

Two kinds of loss, both decided from the job rows (the source of truth):

* a **lost worker**: a running job whose heartbeat is older than ``heartbeat_timeout_s``. It
  is queued again while ``attempts < max_attempts`` (a killed worker's job runs exactly once
  more), else failed with ``worker_lost``. A job whose cancellation was requested is cancelled.
* a **lost message**: a queued job whose doorbell was published under an older broker epoch
  (Redis restarted without persistence), or never published (the gateway died between the
  commit and the publish). Its doorbell is sent again.

Every worker and the gateway run the reaper periodically; all updates are conditional, so
several reapers at once do no harm, and a duplicate doorbell is a no-op for the claim.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from sqlalchemy import or_, select, update

from models.registry import get_spec
from service.jobs.lifecycle import add_message, apply_update
from service.jobs.queue import broker_epoch, send_doorbell
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


def _recover_stale(settings: Settings, report: ReapReport) -> None:
    cutoff = now() - settings.heartbeat_timeout_s
    with session_scope(settings.resolved_database_url) as session:
        stale = session.execute(
            select(Job.id, Job.run_token, Job.attempts, Job.cancel_requested)
            .where(Job.state == "running", Job.heartbeat_at < cutoff)
            .limit(_BATCH)
        ).all()
        for job_id, token, attempts, cancel in stale:
            owned = (Job.id == job_id, Job.run_token == token, Job.state == "running")
            if cancel:
                values = {"state": "cancelled", "finished_at": now(), "run_token": ""}
                target, text = report.cancelled, "cancelled (its worker was lost)"
            elif attempts < settings.max_attempts:
                values = {"state": "queued", "run_token": "", "worker": "", "step": "re-queued"}
                target = report.requeued
                text = f"worker lost during attempt {attempts}; queued again"
            else:
                values = {
                    "state": "failed",
                    "finished_at": now(),
                    "error_code": "worker_lost",
                    "error": f"the worker was lost during attempt {attempts} of "
                    f"{settings.max_attempts}",
                }
                target, text = report.failed, f"worker lost during attempt {attempts}; failed"
            won = apply_update(session, update(Job).where(*owned).values(**values))
            if won == 1:
                add_message(session, job_id, text)
                target.append(job_id)
                log.warning("job %s: %s", job_id, text)


def _unpublished(settings: Settings, epoch: str) -> list[tuple[str, str, int]]:
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
    return [(r[0], r[1], r[2]) for r in rows]


def publish(settings: Settings, job_ids: list[str]) -> None:
    """Send the doorbell of each (committed) queued job and record the broker epoch it went to."""
    if not job_ids:
        return
    epoch = broker_epoch(settings)
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(
            select(Job.id, Job.pipeline, Job.priority).where(Job.id.in_(job_ids))
        ).all()
    for job_id, pipeline, priority in rows:
        send_doorbell(settings, job_id, get_spec(pipeline), priority)
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids))
            .values(broker_epoch=epoch, enqueued_at=now())
            .execution_options(synchronize_session=False)
        )


def reap(settings: Settings) -> ReapReport:
    """Run one reaper pass (see the module docstring)."""
    report = ReapReport()
    _recover_stale(settings, report)
    epoch = broker_epoch(settings)
    report.republished = [
        job_id for job_id, _, _ in _unpublished(settings, epoch) if job_id not in report.requeued
    ]
    if report.republished:
        log.warning("re-publishing %d queued job(s) lost by the broker", len(report.republished))
    publish(settings, report.requeued + report.republished)
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
