"""Progress, heartbeat, cancellation and the soft time limit of one running job attempt.

The pipeline's progress callback writes progress at most every ``progress_interval_s`` and is
where cancellation takes effect (cooperatively: the pipeline stops at its next progress point).
A heartbeat thread keeps the job alive while a long step reports nothing, and learns there
whether the attempt still owns the job.
"""

from __future__ import annotations

import logging
import threading
import time

from models.errors import Cancelled, PipelineFailed
from service.jobs.lifecycle import Claim, Liveness, heartbeat
from service.settings import Settings

log = logging.getLogger(__name__)


class OwnershipLost(Exception):
    """This attempt no longer owns its job (the reaper gave it to another attempt)."""


class JobProgress:
    """Progress callback of one attempt, with its heartbeat thread.

    Use as a context manager around the pipeline call; the instance is the callback
    ``(fraction, step) -> None``.
    """

    def __init__(self, settings: Settings, claim: Claim, soft_limit_s: float) -> None:
        self.settings = settings
        self.claim = claim
        self.soft_limit_s = soft_limit_s
        self._started = time.monotonic()
        self._last_write = 0.0
        self._liveness = Liveness(owned=True, cancel_requested=False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="voxelgate-heartbeat", daemon=True)

    def __enter__(self) -> JobProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                self._liveness = heartbeat(self.settings, self.claim)
            except Exception:  # a DB hiccup must not kill the job; the next beat retries
                log.exception("heartbeat of job %s failed", self.claim.job_id)

    def check(self) -> None:
        """Raise if the attempt must stop: lost ownership, cancellation, or soft time limit."""
        if not self._liveness.owned:
            raise OwnershipLost(self.claim.job_id)
        if self._liveness.cancel_requested:
            raise Cancelled("cancelled by request")
        elapsed = time.monotonic() - self._started
        if elapsed > self.soft_limit_s:
            raise PipelineFailed(
                f"{self.claim.pipeline} exceeded its time limit of {self.soft_limit_s:.0f} s"
            )

    def __call__(self, fraction: float, step: str) -> None:
        """Record progress (throttled) and stop the pipeline here if it must stop."""
        t = time.monotonic()
        if t - self._last_write >= self.settings.progress_interval_s:
            self._last_write = t
            self._liveness = heartbeat(self.settings, self.claim, fraction, step)
        self.check()
