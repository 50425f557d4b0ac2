"""End to end on real parts: app + Redis + a real Celery worker process, real CT, real pipeline."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from .conftest import FAST_PARAMS, Api, WorkerFactory, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_upload_denoise_poll_download(api: Api, workers: WorkerFactory, ct3_dir: Path) -> None:
    workers("w1")
    series_id = api.upload_series(ct3_dir)
    response = api.post(
        "/jobs",
        json={"series_id": series_id, "pipeline": "zeroshot-denoise", "params": FAST_PARAMS},
    )
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    seen: list[tuple[str, float]] = []

    def finished() -> dict[str, Any] | None:
        view = api.get(f"/jobs/{job_id}").json()
        seen.append((view["state"], view["progress_percent"]))
        return dict(view) if view["finished"] else None

    view = wait_until(finished, 120, "the job to finish", period=0.1)
    assert view["state"] == "succeeded", view
    progress = [p for _, p in seen]
    assert progress == sorted(progress), seen  # progress never goes back
    assert {state for state, _ in seen} <= {"queued", "running", "succeeded"}
    assert view["attempts"] == 1
    assert view["progress_percent"] == 100.0
    assert view["timings"]["run_s"] > 0
    assert {"denoised.nii.gz", "result.json", "denoised_dicom.zip"} <= set(view["outputs"])

    nifti = api.get(f"/jobs/{job_id}/outputs/denoised.nii.gz")
    assert nifti.status_code == 200
    image = nib.Nifti1Image.from_bytes(gzip.decompress(nifti.content))
    assert image.shape == (512, 512, 3)
    assert np.isfinite(image.get_fdata()).all()

    record = json.loads(api.get(f"/jobs/{job_id}/outputs/result.json").content)
    assert record["provenance"]["pipeline"] == "zeroshot-denoise"
    assert record["provenance"]["parameters"]["max_iterations"] == FAST_PARAMS["max_iterations"]
    with zipfile.ZipFile(
        io.BytesIO(api.get(f"/jobs/{job_id}/outputs/denoised_dicom.zip").content)
    ) as zf:
        assert len([n for n in zf.namelist() if not n.endswith("/")]) == 3

    metrics = api.get("/metrics").text
    assert 'voxelgate_jobs{state="succeeded"} 1.0' in metrics


def test_priority_is_honoured(api: Api, workers: WorkerFactory, ct3_dir: Path) -> None:
    series_id = api.upload_series(ct3_dir)

    # Queued before any worker runs, in an order that a FIFO queue would get wrong.
    low, high, mid = (api.submit(series_id, FAST_PARAMS, p) for p in (1, 9, 5))
    workers("w1")
    views = {j: api.wait_job(j, timeout=180) for j in (low, high, mid)}
    assert all(v["state"] == "succeeded" for v in views.values()), views
    started = sorted(views, key=lambda j: views[j]["timings"]["started_at"])
    assert started == [high, mid, low]


def test_distributed_mode_on_postgresql(
    tmp_path: Path, redis_server: Any, postgres_url: str, ct3_dir: Path
) -> None:
    """The same flow with PostgreSQL as the job store (the distributed deployment)."""
    from service.store.db import upgrade_schema

    from .conftest import fast_settings, make_api

    settings = fast_settings(tmp_path, broker_url=redis_server.url, database_url=postgres_url)
    upgrade_schema(settings.resolved_database_url)
    factory = WorkerFactory(settings, tmp_path)
    try:
        factory("pg")
        for api in make_api(settings):
            series_id = api.upload_series(ct3_dir)
            again = api.upload_dir(ct3_dir)  # idempotent re-upload
            assert again["instances_stored"] == 0
            assert again["instances_duplicate"] == 3
            job = api.post(
                "/jobs",
                json={
                    "series_id": series_id,
                    "pipeline": "zeroshot-denoise",
                    "params": FAST_PARAMS,
                },
            )
            assert job.status_code == 201, job.text
            view = api.wait_job(job.json()["id"])
            assert view["state"] == "succeeded", view
    finally:
        for worker in factory.started:
            worker.stop()
