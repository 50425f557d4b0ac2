"""The queue: the only Celery import on the gateway side, and the one Celery configuration.

A message is a *doorbell* carrying one job id: ``voxelgate.run_job(job_id)``. The job row in the
database is the source of truth; a worker that receives a message claims the most urgent queued
job of that queue from the database (see :mod:`service.jobs.lifecycle`), which makes priority
independent of the broker (Redis or the embedded SQLAlchemy transport) and makes duplicate or
late messages harmless: every claim is a conditional update that only one attempt can win.

Lost messages are detected by the *broker epoch*: a random token stored in Redis under
``voxelgate:broker-epoch``. A Redis restarted without persistence loses the token together with
its queues, so the next caller sets a new one, and the reaper re-sends the doorbell of every job
still queued under an older epoch. The embedded SQLite broker persists its messages and has a
constant epoch.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any, NamedTuple

from celery import Celery

from models.registry import IO_QUEUE, PipelineSpec, all_specs, get_spec
from service.settings import Settings

log = logging.getLogger(__name__)

RUN_JOB_TASK = "voxelgate.run_job"
DELIVER_TASK = "voxelgate.deliver"
FETCH_COHORT_TASK = "voxelgate.fetch_cohort"
_EPOCH_KEY = "voxelgate:broker-epoch"
_SQLA_EPOCH = "sqla"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the gateway (producer) and the workers (consumer).

    JSON only; late acknowledgement with re-queue when the worker process is lost; one message
    prefetched per process; results are not stored (the job row holds the outcome).
    """
    longest = max(spec.time_limit_s for spec in all_specs()) + settings.time_limit_grace_s
    visibility = max(3600, 2 * longest)
    return {
        "broker_url": settings.resolved_broker_url,
        "broker_connection_retry_on_startup": True,
        # Redis: an unacknowledged message returns to the queue after this long (longer than
        # any job, so a slow job is never run twice by redelivery). The SQLAlchemy transport
        # passes options to create_engine, so it gets none.
        "broker_transport_options": (
            {"visibility_timeout": visibility} if settings.broker_is_redis else {}
        ),
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": "cpu",
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "enable_utc": True,
    }


_PRODUCERS: dict[str, Celery] = {}


def producer(settings: Settings) -> Celery:
    """Return the process-wide Celery app used to send messages to ``settings``' broker."""
    url = settings.resolved_broker_url
    if url not in _PRODUCERS:
        app = Celery("voxelgate-gateway")
        app.conf.update(celery_config(settings))
        _PRODUCERS[url] = app
    return _PRODUCERS[url]


def prepare_broker(settings: Settings) -> None:
    """Connect once, so that the embedded broker's tables exist before workers start.

    kombu's SQLAlchemy transport creates its tables on first use; doing that here, before the
    worker process starts, avoids two processes racing to create them in a fresh SQLite file.
    """
    with producer(settings).connection_for_write() as connection:
        connection.ensure_connection(max_retries=3)
        connection.default_channel  # noqa: B018 - opening the channel creates the tables


def time_limits(spec: PipelineSpec, settings: Settings) -> tuple[int, int]:
    """Soft and hard time limits (s) of one job of ``spec``."""
    return spec.time_limit_s, spec.time_limit_s + settings.time_limit_grace_s


class Doorbell(NamedTuple):
    """What one ``run_job`` message needs: the job, its pipeline (queue, time limits), priority."""

    job_id: str
    pipeline: str
    priority: int


def send_doorbell(settings: Settings, bell: Doorbell) -> None:
    """Publish one ``run_job`` message for ``bell.job_id`` on the pipeline's queue.

    Call only after the job row is committed.
    """
    spec = get_spec(bell.pipeline)
    soft, hard = time_limits(spec, settings)
    producer(settings).send_task(
        RUN_JOB_TASK,
        args=[bell.job_id],
        queue=spec.queue,
        priority=bell.priority,
        soft_time_limit=soft,
        time_limit=hard,
    )


def send_io_task(settings: Settings, task: str, arg: str, countdown_s: float | None = None) -> None:
    """Publish ``task(arg)`` on the io queue (a delivery or cohort-fetch id; after the commit)."""
    producer(settings).send_task(task, args=[arg], queue=IO_QUEUE, countdown=countdown_s)


_REDIS_CLIENTS: dict[str, Any] = {}


def _redis(url: str) -> Any:
    """One Redis client (with its connection pool) per URL and process."""
    if url not in _REDIS_CLIENTS:
        import redis

        _REDIS_CLIENTS[url] = redis.Redis.from_url(url, socket_timeout=5)
    return _REDIS_CLIENTS[url]


def broker_epoch(settings: Settings) -> str:
    """Return the broker's current epoch token (see the module docstring)."""
    if not settings.broker_is_redis:
        return _SQLA_EPOCH
    client = _redis(settings.resolved_broker_url)
    candidate = secrets.token_hex(8)
    client.set(_EPOCH_KEY, candidate, nx=True)
    value = client.get(_EPOCH_KEY)
    return value.decode() if isinstance(value, bytes) else candidate
