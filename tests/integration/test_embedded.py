"""`voxelgate serve`: gateway + worker on one machine with no server (SQLite + SQLite broker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import FAST_PARAMS, REPO, fast_settings, free_port, service_env, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_serve_runs_a_job_end_to_end(tmp_path: Path, ct3_dir: Path) -> None:
    settings = fast_settings(tmp_path)  # no database_url, no broker_url: the embedded defaults
    assert not settings.broker_is_redis
    assert settings.resolved_database_url.startswith("sqlite")
    env = service_env(settings)
    key = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "create", "clinic"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert key.startswith("vg_")
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    headers = {"X-API-Key": key}
    try:
        with httpx.Client(base_url=base, timeout=30) as client:

            def healthy() -> bool:
                try:
                    return client.get("/health").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(healthy, 60, "the gateway to answer")
            files = [
                ("files", (p.name, p.read_bytes(), "application/dicom"))
                for p in sorted(ct3_dir.iterdir())
            ]
            upload = client.post("/studies", files=files, headers=headers)
            assert upload.status_code == 201, (upload.text, log_path.read_text()[-4000:])
            series_id = upload.json()["studies"][0]["series"][0]["id"]
            job = client.post(
                "/jobs",
                headers=headers,
                json={
                    "series_id": series_id,
                    "pipeline": "zeroshot-denoise",
                    "params": FAST_PARAMS,
                },
            )
            assert job.status_code == 201, (job.text, log_path.read_text()[-4000:])
            job_id = job.json()["id"]

            def finished() -> dict[str, Any] | None:
                view = client.get(f"/jobs/{job_id}", headers=headers).json()
                return view if view["finished"] else None

            view = wait_until(finished, 180, "the embedded worker to finish the job", 0.5)
            assert view["state"] == "succeeded", (view, log_path.read_text()[-3000:])
            nifti = client.get(f"/jobs/{job_id}/outputs/denoised.nii.gz", headers=headers)
            assert nifti.status_code == 200
            assert nifti.content[:2] == b"\x1f\x8b"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert (settings.data_dir / "broker.db").exists()  # the SQLite broker, not a server
