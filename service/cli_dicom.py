"""The ``voxelgate scp`` command: the DICOM listener in its own process.

Settings come from the environment (``VOXELGATE_*``); ``--config`` names the DICOM TOML file
(else ``VOXELGATE_DICOM_CONFIG``). SIGTERM and SIGINT stop it cleanly: no new association, open
ones are ended, the flusher finishes the study it is ingesting; what is still spooled is
ingested by the next start.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from service.settings import get_settings

log = logging.getLogger("voxelgate")


def cmd_scp(args: argparse.Namespace) -> int:
    """Run the DICOM listener until SIGTERM/SIGINT."""
    from service.dicom.config import load_dicom_config
    from service.dicom.scp import Listener
    from service.jobs.queue import prepare_broker
    from service.store.auth import ensure_tenant
    from service.store.db import session_scope, upgrade_schema

    settings = get_settings()
    if args.config:
        settings = settings.model_copy(update={"dicom_config": Path(args.config)})
    config = load_dicom_config(settings)
    if args.port is not None:
        listener = config.listener.model_copy(update={"port": args.port})
        config = config.model_copy(update={"listener": listener})
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom logs the offending value of an invalid element (could be a patient attribute);
    # the listener answers such data sets with a status instead
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    upgrade_schema(settings.resolved_database_url)
    if not settings.broker_is_redis:
        prepare_broker(settings)
    with session_scope(settings.resolved_database_url) as session:
        tenant_id = ensure_tenant(session, config.listener.tenant).id
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping the DICOM listener", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = Listener(settings, config, tenant_id)
    server.start()
    print(f"voxelgate scp listening on {config.listener.host}:{server.port}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()
    log.info("DICOM listener stopped")
    return 0


def add_dicom_commands(sub: Any) -> None:
    """Register ``scp`` on the CLI's subparsers."""
    p_scp = sub.add_parser("scp", help="DICOM listener: C-ECHO, C-STORE into the store, routing")
    p_scp.add_argument("--config", help="DICOM TOML file (default: VOXELGATE_DICOM_CONFIG)")
    p_scp.add_argument("--port", type=int, help="override listener.port (0: any free port)")
    p_scp.set_defaults(func=cmd_scp)
