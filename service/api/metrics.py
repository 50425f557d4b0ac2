"""Prometheus metrics of the gateway (``GET /metrics``).

Job figures are read from the job store at scrape time, so every gateway process reports the
same numbers and nothing is lost on a restart:

- ``voxelgate_queue_depth{queue}``: jobs in state ``queued`` per worker queue (gauge).
- ``voxelgate_oldest_queued_seconds{queue}``: age of the oldest queued job (gauge; 0 if none).
- ``voxelgate_jobs{state}``: jobs in each state (gauge; every state listed, 0 included).
- ``voxelgate_job_duration_seconds{pipeline}``: ``finished_at - started_at`` of succeeded jobs
  (histogram, buckets 1 s .. 2 h); bucket counts are computed by the database.

``voxelgate_ingest_bytes_total`` is a process counter the upload route increments with the bytes
it stored; with several gateway processes each reports its own (sum them in PromQL).

Metrics live in private registries, never in prometheus_client's global one, so importing this
module twice (tests, reloads) cannot collide and no process/platform collectors leak in.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from models.registry import QUEUES
from service.jobs.lifecycle import STATES
from service.store.tables import Job, now

DURATION_BUCKETS_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
                      3600.0, 7200.0)  # fmt: skip

PROCESS_REGISTRY = CollectorRegistry(auto_describe=True)
"""Process-level metrics (the ingest counter); also exported by :func:`render_metrics`."""

INGEST_BYTES = Counter(
    "voxelgate_ingest_bytes",
    "Bytes of instances stored by uploads in this gateway process.",
    registry=PROCESS_REGISTRY,
)


class StoreCollector(Collector):
    """Job metrics read from the job store when collected.

    Args:
        session: Open session, used only for reads during :meth:`collect`.
    """

    def __init__(self, session: Session) -> None:
        self._session = session

    def collect(self) -> Iterator[Metric]:
        """Yield the queue, state and duration families (one query each)."""
        yield from self._queue_metrics()
        yield self._state_metric()
        yield self._duration_metric()

    def _queue_metrics(self) -> Iterator[Metric]:
        rows = self._session.execute(
            select(Job.queue, func.count(), func.min(Job.created_at))
            .where(Job.state == "queued")
            .group_by(Job.queue)
        ).all()
        found = {queue: (int(n), oldest) for queue, n, oldest in rows}
        depth = GaugeMetricFamily(
            "voxelgate_queue_depth", "Jobs waiting in state queued.", labels=["queue"]
        )
        age = GaugeMetricFamily(
            "voxelgate_oldest_queued_seconds",
            "Age of the oldest queued job, seconds (0 when none is queued).",
            labels=["queue"],
        )
        t = now()
        for queue in sorted(set(QUEUES) | set(found)):
            n, oldest = found.get(queue, (0, None))
            depth.add_metric([queue], n)
            age.add_metric([queue], max(0.0, t - oldest) if oldest is not None else 0.0)
        yield depth
        yield age

    def _state_metric(self) -> Metric:
        rows = self._session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        counts = dict.fromkeys(STATES, 0) | {state: int(n) for state, n in rows}
        family = GaugeMetricFamily("voxelgate_jobs", "Jobs in each state.", labels=["state"])
        for state, n in counts.items():
            family.add_metric([state], n)
        return family

    def _duration_metric(self) -> Metric:
        duration = Job.finished_at - Job.started_at
        bucket_columns = [func.sum(case((duration <= b, 1), else_=0)) for b in DURATION_BUCKETS_S]
        rows = self._session.execute(
            select(Job.pipeline, func.count(), func.sum(duration), *bucket_columns)
            .where(
                Job.state == "succeeded",
                Job.started_at.is_not(None),
                Job.finished_at.is_not(None),
            )
            .group_by(Job.pipeline)
            .order_by(Job.pipeline)
        ).all()
        family = HistogramMetricFamily(
            "voxelgate_job_duration_seconds",
            "Run time of succeeded jobs (finished_at - started_at), seconds.",
            labels=["pipeline"],
        )
        for pipeline, count, total, *cumulative in rows:
            buckets = [
                (floatToGoString(b), int(c or 0))
                for b, c in zip(DURATION_BUCKETS_S, cumulative, strict=True)
            ]
            buckets.append(("+Inf", int(count)))
            family.add_metric([pipeline], buckets, float(total or 0.0))
        return family


def render_metrics(session: Session) -> tuple[bytes, str]:
    """Render every metric in the Prometheus text exposition format.

    Args:
        session: Open session on the job store (read only).

    Returns:
        ``(body, content_type)`` for the HTTP response.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(session))
    registry.register(INGEST_BYTES)
    return generate_latest(registry), CONTENT_TYPE_LATEST
