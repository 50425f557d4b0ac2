"""Sinogram bundles through the REST API: upload, store, submit, run, download.

The bundle is the real sarepy neutron sinogram (../shared/data/sarepy) with a geometry JSON; the
job is run by the worker's own job runner in this process (no queue consumer runs here).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.unit.api_world import assert_error, client, new_caller, settings  # noqa: F401
from workers.job_runner import run_job

SAREPY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sarepy"
TIF = SAREPY / "sinogram_360_neutron_image.tif"

GEOMETRY: dict[str, Any] = {
    "format": "voxelgate-sinogram/1",
    "data": "neutron.tif",
    "quantity": "counts",
    "flat_field": "edges",
    "zero_counts": "clip",
    "beam": "parallel",
    "angles": {"stop_deg": 360, "endpoint": True},
    "centre_of_rotation": "auto",
    "image_size": 128,
    "pixel_size_mm": 4.0,
    "modality": "OT",
    "description": "sarepy neutron sinogram",
}


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _upload(app: TestClient, headers: dict[str, str], members: dict[str, bytes]) -> Any:
    return app.post(
        "/studies",
        files=[("files", ("bundle.zip", _zip(members), "application/zip"))],
        headers=headers,
    )


def test_bundle_upload_job_and_download(client: TestClient, settings: Settings) -> None:  # noqa: F811
    if not TIF.exists():
        pytest.skip(f"{TIF} not available")
    a = new_caller(settings, "lab")
    members = {
        "scan/geometry.json": json.dumps(GEOMETRY).encode(),
        "scan/neutron.tif": TIF.read_bytes(),
    }
    response = _upload(client, a.headers, members)
    assert response.status_code == 201, response.text
    report = response.json()
    assert report["instances_stored"] == 2
    study = report["studies"][0]
    series = study["series"][0]
    assert series["kind"] == "sinogram"
    assert series["modality"] == "OT"
    detail = client.get(f"/studies/{study['id']}", headers=a.headers).json()
    assert detail["series"][0]["kind"] == "sinogram"
    again = _upload(client, a.headers, members).json()  # the same bundle: duplicates only
    assert again["instances_stored"] == 0
    assert again["instances_duplicate"] == 2

    body = {
        "series_id": series["id"],
        "pipeline": "sparse-view-ct",
        "params": {"method": "fbp", "view_stride": 2},
    }
    job = client.post("/jobs", json=body, headers=a.headers)
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    assert run_job(settings, job_id) == job_id
    status = client.get(f"/jobs/{job_id}", headers=a.headers).json()
    assert status["state"] == "succeeded", status
    assert "reconstruction.nii.gz" in status["outputs"]
    nifti = client.get(f"/jobs/{job_id}/outputs/reconstruction.nii.gz", headers=a.headers)
    assert nifti.status_code == 200
    result = client.get(f"/jobs/{job_id}/outputs/result.json", headers=a.headers).json()
    m = result["measurements"]
    assert (m["views_in_data"], m["views"], m["units"]) == (458, 229, "1/mm")
    assert m["normalisation"]["centre_of_rotation"].startswith("auto")
    assert np.isfinite(m["fbp_psnr_db"])


def test_bad_bundles_are_refused_and_nothing_is_stored(
    client: TestClient,  # noqa: F811
    settings: Settings,  # noqa: F811
) -> None:
    a = new_caller(settings, "lab")
    data = np.ones((30, 40), dtype=np.float32)
    buffer = io.BytesIO()
    np.save(buffer, data)
    npy = buffer.getvalue()
    line = {
        "format": "voxelgate-sinogram/1",
        "data": "s.npy",
        "quantity": "line_integrals",
        "beam": "parallel",
    }
    cases = [
        ({"g.json": json.dumps(line).encode()}, "'s.npy' is not in the upload"),
        ({"g.json": json.dumps({**line, "views": 31}).encode(), "s.npy": npy}, "views=31"),
        ({"g.json": json.dumps({**line, "beam": "cone"}).encode(), "s.npy": npy}, "beam"),
        ({"g.json": json.dumps(line).encode(), "s.npy": b"\x93NUMPY truncated"}, "s.npy"),
        (
            {
                "g.json": json.dumps({**line, "axes": ["slices", "views", "detectors"]}).encode(),
                "s.npy": npy,
            },
            "2 axes",
        ),
    ]
    for members, message in cases:
        response = _upload(client, a.headers, members)
        error = assert_error(response, 422, "input_rejected")
        assert message in error["message"], (message, error)
    assert client.get("/studies", headers=a.headers).json()["studies"] == []
