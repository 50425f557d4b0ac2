"""Prometheus exposition read from real SQLite and PostgreSQL stores."""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.api.metrics import DURATION_BUCKETS_S, INGEST_BYTES, render_metrics
from service.store.db import session_scope
from service.store.tables import Job
from tests.conftest import seed_series


@pytest.fixture
def url(store_settings) -> str:  # type: ignore[no-untyped-def]
    return store_settings.resolved_database_url


def _jobs(url: str, tenant_id: str, series_id: str, specs: list[dict[str, Any]]) -> None:
    with session_scope(url) as s:
        for spec in specs:
            fields = {"pipeline": "zeroshot-denoise", "queue": "cpu", **spec}
            s.add(Job(tenant_id=tenant_id, series_id=series_id, pipeline_version="1.0.0", **fields))


def _scrape(url: str) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    with session_scope(url) as s:
        body, content_type = render_metrics(s)
    assert content_type.startswith("text/plain")
    families: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        samples = families.setdefault(family.name, {})
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return families


def test_empty_store_reports_zeros(url: str) -> None:
    m = _scrape(url)
    assert m["voxelgate_queue_depth"] == {
        ("voxelgate_queue_depth", (("queue", "cpu"),)): 0,
        ("voxelgate_queue_depth", (("queue", "gpu"),)): 0,
    }
    jobs = m["voxelgate_jobs"]
    assert sorted(labels[0][1] for _, labels in jobs) == sorted(
        ["queued", "running", "succeeded", "failed", "cancelled"]
    )
    assert set(jobs.values()) == {0}
    assert m.get("voxelgate_job_duration_seconds", {}) == {}
    assert "voxelgate_ingest_bytes" in m


def test_figures_match_the_rows(url: str) -> None:
    tenant_id, series_id = seed_series(url)
    t0 = 1_700_000_000.0
    durations_denoise = [0.5, 1.0, 45.0, 4000.0, 9000.0]
    durations_sparse = [12.25]
    created = time.time() - 120.0
    _jobs(
        url,
        tenant_id,
        series_id,
        [{"state": "queued", "queue": "gpu", "created_at": created + i} for i in range(3)]
        + [{"state": "queued", "queue": "cpu"}]
        + [{"state": "running", "queue": "gpu", "started_at": t0}] * 2
        + [{"state": "failed", "started_at": t0, "finished_at": t0 + 3.0}]
        + [{"state": "cancelled"}]
        + [
            {"state": "succeeded", "started_at": t0, "finished_at": t0 + d}
            for d in durations_denoise
        ]
        + [
            {
                "state": "succeeded",
                "pipeline": "sparse-view-ct",
                "queue": "gpu",
                "started_at": t0,
                "finished_at": t0 + d,
            }
            for d in durations_sparse
        ]
        + [{"state": "succeeded", "started_at": None, "finished_at": t0}],  # no run time known
    )
    m = _scrape(url)

    depth = m["voxelgate_queue_depth"]
    assert depth[("voxelgate_queue_depth", (("queue", "gpu"),))] == 3
    assert depth[("voxelgate_queue_depth", (("queue", "cpu"),))] == 1
    age = m["voxelgate_oldest_queued_seconds"][
        ("voxelgate_oldest_queued_seconds", (("queue", "gpu"),))
    ]
    assert 119.0 <= age <= 180.0

    jobs = {labels[0][1]: v for (_, labels), v in m["voxelgate_jobs"].items()}
    assert jobs == {"queued": 4, "running": 2, "failed": 1, "cancelled": 1, "succeeded": 7}

    hist = m["voxelgate_job_duration_seconds"]
    for pipeline, durations in (
        ("zeroshot-denoise", durations_denoise),
        ("sparse-view-ct", durations_sparse),
    ):

        def sample(name: str, pipeline: str = pipeline, **labels: str) -> float:
            key = tuple(sorted({"pipeline": pipeline, **labels}.items()))
            return hist[(f"voxelgate_job_duration_seconds_{name}", key)]

        assert sample("count") == len(durations)
        assert sample("sum") == pytest.approx(sum(durations))
        for bound in DURATION_BUCKETS_S:
            expected = sum(d <= bound for d in durations)
            assert sample("bucket", le=str(bound)) == expected, bound
        assert sample("bucket", le="+Inf") == len(durations)
    # 0.5 s and exactly 1 s fall in le=1; 9000 s only in +Inf
    assert (
        hist[
            (
                "voxelgate_job_duration_seconds_bucket",
                (("le", "1.0"), ("pipeline", "zeroshot-denoise")),
            )
        ]
        == 2
    )
    assert (
        hist[
            (
                "voxelgate_job_duration_seconds_bucket",
                (("le", "7200.0"), ("pipeline", "zeroshot-denoise")),
            )
        ]
        == 4
    )


def test_ingest_counter_is_exported(url: str) -> None:
    before = _scrape(url)["voxelgate_ingest_bytes"][("voxelgate_ingest_bytes_total", ())]
    INGEST_BYTES.inc(140_000_000)
    after = _scrape(url)["voxelgate_ingest_bytes"][("voxelgate_ingest_bytes_total", ())]
    assert after - before == 140_000_000


def test_scrape_reads_the_store_each_time(url: str) -> None:
    tenant_id, series_id = seed_series(url)
    _jobs(url, tenant_id, series_id, [{"state": "queued"}])
    key = ("voxelgate_queue_depth", (("queue", "cpu"),))
    assert _scrape(url)["voxelgate_queue_depth"][key] == 1
    with session_scope(url) as s:
        job = s.query(Job).one()
        job.state = "running"
    assert _scrape(url)["voxelgate_queue_depth"][key] == 0
