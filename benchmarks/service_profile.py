"""The gateway under call timers and a wall-clock stack sampler (``service.py --profile-dir``).

A stand-in for py-spy, which is not available here: per-call wall and CPU times of the submit
path's functions (wrapped in this process only; no project code changed), threadpool queueing,
server-side request time, and wall-clock stack samples of all threads. SIGUSR1 appends one
snapshot to the output file. Started by ``benchmarks/service.py`` as
``python benchmarks/service_profile.py PORT OUT``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


_BUSY_MARKERS = (
    "service/",
    "models/",
    "sqlalchemy",
    "fastapi",
    "starlette",
    "kombu",
    "celery",
    "redis",
    "psycopg",
    "pydantic",
    "uvicorn/protocols",
    "anyio/to_thread",
)


def profiled_gateway(port: int, out: Path, interval: float = 0.01) -> None:
    """The gateway with call timers and a wall-clock stack sampler (see the module docstring).

    SIGUSR1 appends a snapshot (label read from ``out.label``) to ``out`` and resets it.
    """
    # benchmarks/ is on sys.path first and holds service.py: it must not shadow ``service``
    here = Path(__file__).resolve().parent
    sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != here]
    import fastapi.dependencies.utils
    import fastapi.routing
    import sqlalchemy.orm
    import sqlalchemy.pool
    import uvicorn

    import service.api.deps
    import service.api.routes.jobs
    import service.api.routes.studies
    import service.jobs.reaper
    import service.jobs.submit
    import service.store.audit
    import service.store.blobs
    import service.store.studies
    from service.api.app import create_app

    times: dict[str, list[float]] = collections.defaultdict(list)
    cpu_times: dict[str, list[float]] = collections.defaultdict(list)
    missing: list[str] = []
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    samples = [0]

    def timed(module: Any, name: str, label: str) -> None:
        original = getattr(module, name, None)
        if original is None:  # renamed since this file was written: time the rest
            missing.append(f"{module.__name__}.{name}")
            return

        async def async_wrapper(*a: Any, **kw: Any) -> Any:
            t, c = time.perf_counter(), time.thread_time()
            try:
                return await original(*a, **kw)
            finally:
                times[label].append(time.perf_counter() - t)
                cpu_times[label].append(time.thread_time() - c)

        def wrapper(*a: Any, **kw: Any) -> Any:
            t, c = time.perf_counter(), time.thread_time()
            try:
                return original(*a, **kw)
            finally:
                times[label].append(time.perf_counter() - t)
                cpu_times[label].append(time.thread_time() - c)

        setattr(module, name, async_wrapper if asyncio.iscoroutinefunction(original) else wrapper)

    for module, name, label in (
        (service.api.deps, "resolve_api_key", "auth: resolve_api_key (in session)"),
        (service.api.routes.jobs, "submit_jobs", "submit_jobs (total)"),
        (service.jobs.submit, "validated_params", "  validated_params"),
        (service.jobs.submit, "_create_jobs", "  _create_jobs (series lookup + insert)"),
        (service.jobs.submit, "publish", "  publish (total)"),
        (service.jobs.reaper, "broker_epoch", "    broker_epoch"),
        (service.jobs.reaper, "send_doorbell", "    send_doorbell"),
        (service.store.audit, "record", "audit.record (add)"),
        (service.api.routes.jobs, "_view", "_view (re-read job)"),
        (service.api.routes.studies, "receive_upload", "upload: receive_upload (async)"),
        (service.api.routes.studies, "ingest_files", "upload: ingest_files (total)"),
        (service.store.studies, "scan_upload", "  scan_upload (read + hash)"),
        (service.store.studies, "group_studies", "  group_studies"),
        (service.store.studies, "_store_groups", "  _store_groups (blobs + rows)"),
        (service.store.blobs.BlobStore, "put_file", "    BlobStore.put_file"),
        (service.api.routes.studies, "study_summary", "upload: study_summary"),
        (sqlalchemy.orm.Session, "commit", "Session.commit (all)"),
        (sqlalchemy.pool.QueuePool, "_do_get", "pool checkout (QueuePool._do_get)"),
    ):
        timed(module, name, label)

    for module in (fastapi.routing, fastapi.dependencies.utils):
        original_rtp = module.run_in_threadpool

        async def rtp(func: Callable[..., Any], *a: Any, _o: Any = original_rtp, **kw: Any) -> Any:
            t0 = time.perf_counter()
            began: list[float] = []
            fn = getattr(func, "__name__", "?")

            def inner() -> Any:
                began.append(time.perf_counter())
                c = time.thread_time()
                try:
                    return func(*a, **kw)
                finally:
                    times[f"in thread: {fn}"].append(time.perf_counter() - began[0])
                    cpu_times[f"in thread: {fn}"].append(time.thread_time() - c)

            try:
                return await _o(inner)
            finally:
                times[f"threadpool wait: {fn}"].append((began or [t0])[0] - t0)

        module.run_in_threadpool = rtp  # type: ignore[attr-defined]

    inner_app = create_app()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        t = time.perf_counter()
        try:
            await inner_app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                times[f"server {scope['method']} /{scope['path'].split('/')[1]}"].append(
                    time.perf_counter() - t
                )

    me = threading.get_ident()
    stop_event = threading.Event()

    def sample() -> None:
        while not stop_event.wait(interval):
            samples[0] += 1
            for tid, frame in sys._current_frames().items():
                names, f = [], frame
                while f is not None and len(names) < 80:
                    code = f.f_code
                    names.append(f"{_short(code.co_filename)}:{code.co_name}")
                    f = f.f_back
                if tid == me or not any(m in n for n in names for m in _BUSY_MARKERS):
                    continue
                own[f"{names[0]}:{frame.f_lineno}"] += 1
                for name in set(names):
                    inclusive[name] += 1

    def snapshot(*_: Any) -> None:
        label = out.with_suffix(".label").read_text() if out.with_suffix(".label").exists() else ""
        stats = {}
        for name, values in sorted(times.items()):
            v = sorted(values)
            stats[name] = {
                "n": len(v),
                "mean_ms": 1000 * sum(v) / len(v),
                "p50_ms": 1000 * v[len(v) // 2],
                "p99_ms": 1000 * v[min(len(v) - 1, round(0.99 * (len(v) - 1)))],
            }
            if cpu_times.get(name):
                stats[name]["cpu_mean_ms"] = 1000 * sum(cpu_times[name]) / len(cpu_times[name])
        record = {
            "label": label,
            "samples": samples[0],
            "interval_s": interval,
            "timers": stats,
            "not_timed": missing,
            "own": own.most_common(30),
            "inclusive": [kv for kv in inclusive.most_common(400) if "/" in kv[0]][:120],
        }
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        times.clear()
        cpu_times.clear()
        own.clear()
        inclusive.clear()
        samples[0] = 0

    signal.signal(signal.SIGUSR1, snapshot)
    threading.Thread(target=sample, daemon=True).start()
    try:
        uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)
    finally:
        stop_event.set()


def _short(filename: str) -> str:
    parts = Path(filename).parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    for root in ("service", "models", "workers"):
        if root in parts:
            return "/".join(parts[parts.index(root) :])
    return parts[-1] if parts else filename


if __name__ == "__main__":
    profiled_gateway(int(sys.argv[1]), Path(sys.argv[2]))
