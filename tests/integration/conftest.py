"""Real parts for the service tests: a private redis-server, real Celery worker processes, the app.

Every process listens on 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# Tiny but real zeroshot-denoise runs on the 3-slice CT (a few seconds on 2 cores).
FAST_PARAMS: dict[str, Any] = {
    "max_iterations": 20,
    "min_iterations": 0,
    "crop_size": 32,
    "batch_size": 2,
    "split_features": 8,
    "plateau_patience": 10,
}
# Long enough to be killed or cancelled mid-run, still bounded (about 20-60 s on 2 cores).
SLOW_PARAMS: dict[str, Any] = {
    **FAST_PARAMS,
    "max_iterations": 2500,
    "min_iterations": 2500,
    "plateau_patience": 5000,
    "crop_size": 64,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, period: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` s pass (then fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class RedisServer:
    """A private redis-server on a free loopback port, without persistence."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        def up() -> bool:
            try:
                return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
            except redis.ConnectionError:
                return False

        wait_until(up, 10, "redis-server to answer")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), workdir=tmp_path)
    server.start()
    yield server
    server.stop()


def service_env(settings: Any) -> dict[str, str]:
    """Environment giving a child process the same settings (VOXELGATE_* variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXELGATE_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"VOXELGATE_{name.upper()}"] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Worker:
    """One `voxelgate worker` process (Celery main process + its pool child)."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill_hard(self) -> None:
        """kill -9 of the whole worker: main process and pool children."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@dataclass
class WorkerFactory:
    settings: Any
    tmp: Path
    started: list[Worker] = field(default_factory=list)

    def __call__(self, name: str = "w1", queues: str = "gpu,cpu") -> Worker:
        log_path = self.tmp / f"worker-{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "service.cli",
                    "worker",
                    "--queues",
                    queues,
                    "--concurrency",
                    "1",
                    "--name",
                    name,
                    "--loglevel",
                    "INFO",
                ],
                cwd=REPO,
                env=service_env(self.settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(proc, log_path)
        self.started.append(worker)
        wait_until(
            lambda: "ready" in worker.log() or proc.poll() is not None, 60, "the worker to be ready"
        )
        if proc.poll() is not None:
            pytest.fail(f"worker exited: {worker.log()}")
        return worker


def fast_settings(tmp_path: Path, **overrides: Any) -> Any:
    """Settings with short heartbeat/reaper periods so that fault tests finish quickly."""
    from service.settings import Settings

    values: dict[str, Any] = {
        "data_dir": tmp_path / "vg-data",
        "heartbeat_interval_s": 0.5,
        "heartbeat_timeout_s": 5.0,
        "reaper_interval_s": 1.0,
        "progress_interval_s": 0.2,
        "torch_threads": 1,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def redis_settings(tmp_path: Path, redis_server: RedisServer) -> Any:
    """Distributed-mode settings: SQLite job store (file) + the private Redis as broker."""
    from service.store.db import upgrade_schema

    settings = fast_settings(tmp_path, broker_url=redis_server.url)
    upgrade_schema(settings.resolved_database_url)
    return settings


@pytest.fixture
def workers(redis_settings: Any, tmp_path: Path) -> Iterator[WorkerFactory]:
    factory = WorkerFactory(redis_settings, tmp_path)
    yield factory
    for worker in factory.started:
        worker.stop()


@dataclass
class Api:
    """A TestClient of the app with one tenant's key."""

    client: Any
    key: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def get(self, url: str, **kw: Any) -> Any:
        return self.client.get(url, headers=self.headers(kw.pop("key", None)), **kw)

    def post(self, url: str, **kw: Any) -> Any:
        return self.client.post(url, headers=self.headers(kw.pop("key", None)), **kw)

    def delete(self, url: str, **kw: Any) -> Any:
        return self.client.delete(url, headers=self.headers(kw.pop("key", None)), **kw)

    def new_key(self, tenant: str) -> str:
        from service.store.auth import create_api_key, create_tenant
        from service.store.db import session_scope

        settings = self.client.app.state.settings
        with session_scope(settings.resolved_database_url) as session:
            return create_api_key(session, create_tenant(session, tenant).id)

    def upload_dir(self, folder: Path, key: str | None = None) -> dict[str, Any]:
        files = [
            ("files", (p.name, p.read_bytes(), "application/dicom"))
            for p in sorted(folder.iterdir())
            if p.is_file()
        ]
        response = self.post("/studies", files=files, key=key)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def upload_series(self, folder: Path) -> str:
        """Upload a one-series folder and return the series id."""
        (study,) = self.upload_dir(folder)["studies"]
        (series,) = study["series"]
        return str(series["id"])

    def submit(self, series_id: str, params: dict[str, Any], priority: int = 5) -> str:
        """Submit a zeroshot-denoise job and return its id."""
        body = {
            "series_id": series_id,
            "pipeline": "zeroshot-denoise",
            "params": params,
            "priority": priority,
        }
        response = self.post("/jobs", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def wait_job(
        self,
        job_id: str,
        timeout: float = 120,
        states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
    ) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            view = self.get(f"/jobs/{job_id}").json()
            return view if view["state"] in states else None

        return dict(wait_until(done, timeout, f"job {job_id} to reach {states}", period=0.3))


def make_api(settings: Any, run_reaper: bool = True) -> Iterator[Api]:
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    with TestClient(create_app(settings, run_reaper=run_reaper)) as client:
        api = Api(client, "")
        api.key = api.new_key("hospital-a")
        yield api


@pytest.fixture
def api(redis_settings: Any) -> Iterator[Api]:
    yield from make_api(redis_settings)
