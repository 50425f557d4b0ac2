"""Helpers of the delivery tests: a finished job with DICOM outputs, a DICOM config, a TCP relay.

A "finished job" is a real job row (succeeded) whose ``*_dicom.zip`` output holds the given
files, written through the blob store like the worker does; no pipeline runs (the round-trip
test runs the real one).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from service.settings import Settings
from service.store.blobs import blob_store
from service.store.db import session_scope
from service.store.tables import AuditEvent, Delivery, Job, now
from tests.conftest import seed_series
from tests.integration.pacs.listener import config_toml


def write_config(settings: Settings, path: Path, nodes: dict[str, dict[str, Any]]) -> Settings:
    """Settings with a DICOM config file holding ``nodes`` (listener AE ``VOXELGATE``)."""
    path.write_text(config_toml({"ae_title": "VOXELGATE"}, nodes))
    return settings.model_copy(update={"dicom_config": path})


def finished_job(settings: Settings, files: list[Path], tenant: str = "clinic") -> tuple[str, str]:
    """A succeeded job whose output ``series_dicom.zip`` holds ``files``; (tenant id, job id)."""
    tenant_id, series_id = seed_series(settings.resolved_database_url, f"{tenant}-{now()}")
    blobs = blob_store(settings)
    with session_scope(settings.resolved_database_url) as s:
        job = Job(
            tenant_id=tenant_id,
            series_id=series_id,
            pipeline="zeroshot-denoise",
            pipeline_version="test",
            queue="cpu",
            state="succeeded",
            finished_at=now(),
            messages=[],
            measurements={},
            params={},
            outputs={},
        )
        s.add(job)
        s.flush()
        out_dir = blobs.job_outputs_dir(job.id)
        out_dir.mkdir(parents=True)
        archive = out_dir / "series_dicom.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for n, path in enumerate(files):
                zf.write(path, f"{n:04d}.dcm")
        job.outputs = {
            "series_dicom.zip": {"key": blobs.key_of(archive), "media_type": "application/zip"}
        }
        return tenant_id, job.id


def delivery(settings: Settings, job_id: str, node: str) -> Delivery:
    """The (detached) delivery row of ``job_id`` to ``node``."""
    with session_scope(settings.resolved_database_url) as s:
        row = s.scalars(
            select(Delivery).where(Delivery.job_id == job_id, Delivery.node == node)
        ).one()
        s.expunge(row)
        return row


def deliver_events(settings: Settings, delivery_id: str) -> list[dict[str, Any]]:
    """The ``deliver`` audit details of one delivery, oldest first."""
    with session_scope(settings.resolved_database_url) as s:
        events = s.scalars(
            select(AuditEvent)
            .where(AuditEvent.action == "deliver", AuditEvent.resource_id == delivery_id)
            .order_by(AuditEvent.id)
        ).all()
        return [dict(e.detail) for e in events]


@dataclass
class Relay:
    """A TCP relay on a fixed loopback port: closed ("node down") until ``open(target)``."""

    port: int
    target: int | None = None
    _server: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def open(self, target: int) -> None:
        """Start accepting on ``port`` and forward every connection to ``127.0.0.1:target``."""
        self.target = target
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(8)
        server.settimeout(0.2)
        self._server = server
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            assert self.target is not None
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=30)
            for a, b in ((client, upstream), (upstream, client)):
                pipe = threading.Thread(target=self._pipe, args=(a, b), daemon=True)
                pipe.start()
                self._threads.append(pipe)

    def _pipe(self, source: socket.socket, dest: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                dest.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, dest):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop accepting and end the relay threads (bounded wait)."""
        self._stop.set()
        if self._server is not None:
            self._server.close()
        for thread in self._threads:
            thread.join(timeout=5)
