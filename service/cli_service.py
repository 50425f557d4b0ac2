"""Service commands of the CLI: ``serve``, ``gateway``, ``worker``, ``db upgrade``, ``keys``.

``serve`` is the single-machine deployment: the gateway in this process and a worker pool in a
child process running the same task code as the distributed workers, both on the embedded
defaults (SQLite job store, kombu's SQLAlchemy transport on SQLite as the broker) unless
``VOXELGATE_DATABASE_URL`` / ``VOXELGATE_BROKER_URL`` say otherwise.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
from typing import Any

from models.registry import WORKER_QUEUES
from service.settings import Settings, get_settings

log = logging.getLogger("voxelgate")


def _settings(args: argparse.Namespace) -> Settings:
    settings = get_settings()
    updates: dict[str, Any] = {}
    if getattr(args, "host", None):
        updates["host"] = args.host
    if getattr(args, "port", None):
        updates["port"] = args.port
    return settings.model_copy(update=updates) if updates else settings


def cmd_gateway(args: argparse.Namespace) -> int:
    """Run the HTTP gateway (uvicorn) in this process."""
    import uvicorn

    from service.api.app import create_app

    settings = _settings(args)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a Celery worker on the given queues (this imports torch in the pool processes)."""
    from workers.celery_app import app

    concurrency = args.concurrency or get_settings().worker_concurrency
    app.conf.worker_concurrency = concurrency
    queues = ",".join(q.strip() for q in args.queues.split(",") if q.strip())
    app.worker_main(
        argv=[
            "worker",
            "-Q",
            queues,
            "--loglevel",
            args.loglevel,
            "-n",
            f"voxelgate-{queues.replace(',', '-')}-%h-{args.name}",
            "--without-mingle",
            "--without-gossip",
        ]
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Gateway + embedded worker pool on one machine."""
    from service.jobs.queue import prepare_broker
    from service.store.db import upgrade_schema

    settings = _settings(args)
    upgrade_schema(settings.resolved_database_url)
    prepare_broker(settings)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "worker",
            "--queues",
            ",".join(WORKER_QUEUES),
            "--name",
            "embedded",
        ]
    )
    log.info(
        "embedded worker started (pid %d); broker %s",
        worker.pid,
        "redis" if settings.broker_is_redis else "embedded SQLite",
    )
    try:
        return cmd_gateway(args)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


def cmd_db_upgrade(_: argparse.Namespace) -> int:
    """Create or upgrade the job-store schema."""
    from service.store.db import upgrade_schema

    upgrade_schema(get_settings().resolved_database_url)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Create an API key for a tenant (the tenant is created if new); print the key once."""
    from service.store.auth import create_api_key, ensure_tenant
    from service.store.db import session_scope, upgrade_schema

    url = get_settings().resolved_database_url
    upgrade_schema(url)
    with session_scope(url) as session:
        key = create_api_key(session, ensure_tenant(session, args.tenant).id, args.label)
    print(key)
    return 0


def add_service_commands(sub: Any) -> None:
    """Register the service subcommands on the CLI's subparsers."""
    for name, func, text in (
        ("serve", cmd_serve, "gateway + embedded worker on one machine (no server needed)"),
        ("gateway", cmd_gateway, "HTTP gateway only"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--host", help="bind address (default from settings: 127.0.0.1)")
        p.add_argument("--port", type=int, help="port (default from settings: 8000)")
        p.set_defaults(func=func)
    p_worker = sub.add_parser("worker", help="queue worker (Celery)")
    p_worker.add_argument(
        "--queues",
        default=",".join(WORKER_QUEUES),
        help="comma-separated: gpu, cpu (pipelines), io (deliveries, PACS fetches)",
    )
    p_worker.add_argument("--concurrency", type=int, default=0, help="jobs at once")
    p_worker.add_argument("--loglevel", default="INFO")
    p_worker.add_argument("--name", default="1", help="suffix of the worker's node name")
    p_worker.set_defaults(func=cmd_worker)
    p_db = sub.add_parser("db", help="job-store schema")
    db_sub = p_db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="create or upgrade the schema").set_defaults(
        func=cmd_db_upgrade
    )
    p_keys = sub.add_parser("keys", help="API keys")
    keys_sub = p_keys.add_subparsers(dest="keys_command", required=True)
    p_create = keys_sub.add_parser("create", help="create a key for a tenant; prints it once")
    p_create.add_argument("tenant", help="tenant name (created if new)")
    p_create.add_argument("--label", default="", help="what the key is for")
    p_create.set_defaults(func=cmd_keys_create)
