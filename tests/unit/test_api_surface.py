"""The API surface: pipelines listed without torch, health, metrics, OpenAPI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from fastapi.testclient import TestClient

from service.settings import Settings
from tests.unit.api_world import (
    PIPELINE,
    REPO,
    api_routes,
    new_caller,
    submit,
    upload_ct,
)


# -- API surface -----------------------------------------------------------------------------
def test_pipelines_listed_without_importing_torch(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        from fastapi.testclient import TestClient
        from service.api.app import create_app
        from service.settings import Settings
        from service.store.auth import create_api_key, create_tenant
        from service.store.db import session_scope
        settings = Settings(data_dir=Path({str(tmp_path / "vg-data")!r}))
        with TestClient(create_app(settings, run_reaper=False)) as client:
            with session_scope(settings.resolved_database_url) as session:
                key = create_api_key(session, create_tenant(session, "t").id)
            headers = {{"Authorization": "Bearer " + key}}
            listing = client.get("/pipelines", headers=headers)
            one = client.get("/pipelines/{PIPELINE}", headers=headers)
            missing = client.get("/pipelines/zeroshot-denoize", headers=headers)
        print(json.dumps({{"listing": listing.json(), "one": one.json(),
                           "missing": [missing.status_code, missing.json()],
                           "torch": "torch" in sys.modules}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch"] is False, "listing pipelines imported torch"
    specs = {p["name"]: p for p in result["listing"]["pipelines"]}
    assert PIPELINE in specs
    spec = specs[PIPELINE]
    assert spec["queue"] == "gpu"
    assert "CT" in spec["inputs"][0]["modalities"]
    props = spec["parameters"]["properties"]
    assert props["max_iterations"]["type"] == "integer"
    assert props["max_iterations"]["minimum"] == 10
    assert props["max_iterations"]["maximum"] == 20000
    assert set(props["method"]["enum"]) == {"auto", "slice_split", "pair_split"}
    assert spec["parameters"].get("additionalProperties") is False
    assert result["one"]["name"] == PIPELINE
    assert result["one"]["model_card"].strip()
    assert result["missing"][0] == 404
    assert "zeroshot-denoise" in result["missing"][1]["error"]["message"]


def test_health_needs_no_key(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def _metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    assert match, f"{name}{{{labels}}} missing from /metrics"
    return float(match[1])


def _ingest_total(text: str) -> float:
    match = re.search(r"^voxelgate_ingest_bytes_total (\S+)$", text, re.M)
    assert match, "voxelgate_ingest_bytes_total missing from /metrics"
    return float(match[1])


def test_metrics_expose_jobs_and_queue_depth(client: TestClient, settings: Settings) -> None:
    a = new_caller(settings, "hospital-a")
    before = client.get("/metrics", headers=a.headers)
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain")
    ingest_before = _ingest_total(before.text)
    uploaded = upload_ct(client, a)
    series_id = uploaded["studies"][0]["series"][0]["id"]
    submit(client, a, series_id=series_id)
    cancelled = submit(client, a, series_id=series_id)["id"]
    client.delete(f"/jobs/{cancelled}", headers=a.headers)

    text = client.get("/metrics", headers=a.headers).text
    assert _metric(text, "voxelgate_queue_depth", 'queue="gpu"') == 1.0
    assert _metric(text, "voxelgate_queue_depth", 'queue="cpu"') == 0.0
    assert _metric(text, "voxelgate_jobs", 'state="queued"') == 1.0
    assert _metric(text, "voxelgate_jobs", 'state="cancelled"') == 1.0
    assert _metric(text, "voxelgate_jobs", 'state="succeeded"') == 0.0
    assert "voxelgate_job_duration_seconds" in text
    assert _ingest_total(text) - ingest_before == uploaded["bytes_stored"] > 0


def test_openapi_documents_every_route_with_summary_and_examples(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    for method, path in api_routes(client):
        operation = doc["paths"].get(path, {}).get(method.lower())
        assert operation is not None, f"{method} {path} missing from OpenAPI"
        assert operation.get("summary", "").strip(), f"{method} {path} has no summary"
    schemas = doc["components"]["schemas"]
    for name in ("JobRequest", "CohortRequest"):
        examples = schemas[name].get("examples")
        assert examples, f"{name} has no examples"
        assert examples[0]["pipeline"] == PIPELINE, name
    job_example = schemas["JobRequest"]["examples"][0]
    assert set(job_example) <= set(schemas["JobRequest"]["properties"])
    upload = doc["paths"]["/studies"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/zip"} <= set(upload)
    assert doc["components"].get("securitySchemes"), "API key schemes are not documented"
