"""The Celery application of the workers (configuration shared with the gateway's producer).

Start with ``voxelgate worker --queues gpu,cpu,io`` (or ``celery -A workers.celery_app worker``).
Each worker process limits torch to ``torch_threads`` threads (default: cores / concurrency, so
that workers x threads never exceeds the cores), and the main process runs the reaper.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from service.jobs.queue import celery_config
from service.jobs.reaper import Reaper
from service.settings import get_settings

log = logging.getLogger(__name__)

app = Celery("voxelgate", include=["workers.tasks", "workers.io_tasks", "workers.pacs_tasks"])
app.conf.update(celery_config(get_settings()))

_reaper: Reaper | None = None


def torch_threads(concurrency: int) -> int:
    """Threads per job: the setting, or the cores shared evenly by ``concurrency`` processes."""
    configured = get_settings().torch_threads
    if configured > 0:
        return configured
    return max(1, (os.cpu_count() or 1) // max(1, concurrency))


@worker_process_init.connect
def _limit_threads(**_: Any) -> None:
    import torch

    threads = torch_threads(int(app.conf.worker_concurrency or 1))
    torch.set_num_threads(threads)
    log.info("worker process %d: torch threads %d", os.getpid(), threads)


@worker_ready.connect
def _start_reaper(**_: Any) -> None:
    global _reaper
    _reaper = Reaper(get_settings())
    _reaper.start()


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()
