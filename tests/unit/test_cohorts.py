"""Cohort roll-up and CSV against real SQLite and PostgreSQL stores."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest

from service.errors import NotFound
from service.jobs.cohorts import CSV_COLUMNS, cohort_csv, cohort_rollup, create_cohort_row
from service.store.db import session_scope
from service.store.tables import Cohort, Job, Series, Study, Tenant

T0 = 1_700_000_000.0


@pytest.fixture
def url(store_settings) -> str:  # type: ignore[no-untyped-def]
    return store_settings.resolved_database_url


def _tenant_with_series(url: str, name: str, n_series: int) -> tuple[str, list[str]]:
    with session_scope(url) as s:
        tenant = Tenant(name=name)
        s.add(tenant)
        s.flush()
        study = Study(tenant_id=tenant.id, study_instance_uid=f"2.25.{len(name)}")
        s.add(study)
        s.flush()
        series = [
            Series(study_id=study.id, series_instance_uid=f"2.25.100{i}", kind="dicom")
            for i in range(n_series)
        ]
        s.add_all(series)
        s.flush()
        return tenant.id, [x.id for x in series]


def _cohort(
    url: str, tenant_id: str, series_ids: list[str], jobs: list[dict[str, Any]]
) -> tuple[str, list[str]]:
    with session_scope(url) as s:
        cohort = create_cohort_row(s, tenant_id, "zeroshot-denoise", {"strength": 1.0})
        rows = []
        for i, (series_id, spec) in enumerate(zip(series_ids, jobs, strict=True)):
            row = Job(
                tenant_id=tenant_id,
                cohort_id=cohort.id,
                series_id=series_id,
                pipeline="zeroshot-denoise",
                pipeline_version="1.0.0",
                queue="cpu",
                created_at=T0 + i,
                **spec,
            )
            rows.append(row)
        s.add_all(rows)
        s.flush()
        return cohort.id, [r.id for r in rows]


MIXED = [
    {
        "state": "succeeded",
        "progress": 1.0,
        "started_at": T0,
        "finished_at": T0 + 42.5,
        "measurements": {
            "noise": {"sigma_hu": 12.5, "method": "slice_split"},
            "n_slices": 20,
            "delta_hu": -3.25,
            "curve": [1, 2, 3],
        },
    },
    {
        "state": "failed",
        "progress": 0.3,
        "started_at": T0,
        "finished_at": T0 + 2.0,
        "error_code": "pipeline_failed",
        "error": '=HYPERLINK("http://evil","x")',
    },
    {"state": "running", "progress": 0.4, "started_at": T0},
    {"state": "queued"},
    {
        "state": "succeeded",
        "progress": 1.0,
        "started_at": T0,
        "finished_at": T0 + 10.0,
        "measurements": {
            "noise": {"sigma_hu": 9.0},
            "label": "-cmd|' /C calc'!A0",
            "state": "shadowed",
            "ok": True,
        },
    },
]


def test_rollup_counts_progress_and_failures(url: str) -> None:
    tenant_id, series = _tenant_with_series(url, "a", 5)
    cohort_id, job_ids = _cohort(url, tenant_id, series, MIXED)
    with session_scope(url) as s:
        r = cohort_rollup(s, tenant_id, cohort_id)
    json.dumps(r)  # JSON-ready
    assert r["id"] == cohort_id
    assert r["pipeline"] == "zeroshot-denoise"
    assert r["params"] == {"strength": 1.0}
    assert r["total"] == 5
    assert r["counts"] == {"queued": 1, "running": 1, "succeeded": 2, "failed": 1, "cancelled": 0}
    assert r["progress"] == pytest.approx((1 + 1 + 0.4 + 0 + 1) / 5)
    assert r["done"] is False
    assert r["failures"] == [
        {
            "job_id": job_ids[1],
            "series_id": series[1],
            "error_code": "pipeline_failed",
            "error": '=HYPERLINK("http://evil","x")',
        }
    ]
    assert r["job_ids"] == job_ids


def test_a_retry_replaces_the_attempt_it_retries(url: str) -> None:
    tenant_id, series = _tenant_with_series(url, "a", 2)
    cohort_id, job_ids = _cohort(
        url,
        tenant_id,
        series,
        [
            {"state": "succeeded", "started_at": T0, "finished_at": T0 + 1},
            {"state": "failed", "error_code": "worker_lost", "error": "worker lost"},
        ],
    )
    with session_scope(url) as s:
        retry = Job(
            tenant_id=tenant_id,
            cohort_id=cohort_id,
            series_id=series[1],
            retry_of=job_ids[1],
            pipeline="zeroshot-denoise",
            pipeline_version="1.0.0",
            queue="cpu",
            state="succeeded",
            progress=1.0,
            started_at=T0,
            finished_at=T0 + 5,
            created_at=T0 + 100,
        )
        s.add(retry)
        s.flush()
        retry_id = retry.id
    with session_scope(url) as s:
        r = cohort_rollup(s, tenant_id, cohort_id)
        rows = list(csv.DictReader(io.StringIO(cohort_csv(s, tenant_id, cohort_id))))
    assert r["counts"]["succeeded"] == 2
    assert r["counts"]["failed"] == 0
    assert r["failures"] == []
    assert r["done"] is True
    assert r["progress"] == 1.0
    assert r["job_ids"] == [job_ids[0], retry_id]
    assert [row["job_id"] for row in rows] == [job_ids[0], retry_id]


def test_csv_rows_columns_and_formula_safety(url: str) -> None:
    tenant_id, series = _tenant_with_series(url, "a", 5)
    cohort_id, job_ids = _cohort(url, tenant_id, series, MIXED)
    with session_scope(url) as s:
        text = cohort_csv(s, tenant_id, cohort_id)
    assert text.endswith("\r\n")
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    extra = [
        "delta_hu",
        "label",
        "measurements.state",
        "n_slices",
        "noise.method",
        "noise.sigma_hu",
        "ok",
    ]
    assert header == [*CSV_COLUMNS, *extra]  # lists ("curve") are not scalars
    rows = [dict(zip(header, row, strict=True)) for row in reader]
    assert [r["job_id"] for r in rows] == job_ids
    assert [r["series_id"] for r in rows] == series
    assert [r["series_instance_uid"] for r in rows] == [f"2.25.100{i}" for i in range(5)]
    assert [r["state"] for r in rows] == ["succeeded", "failed", "running", "queued", "succeeded"]
    assert [r["progress"] for r in rows] == ["1.0", "0.3", "0.4", "0.0", "1.0"]
    assert [r["duration_s"] for r in rows] == ["42.5", "2.0", "", "", "10.0"]

    first, failed, _, queued, last = rows
    assert first["noise.sigma_hu"] == "12.5"
    assert first["noise.method"] == "slice_split"
    assert first["n_slices"] == "20"
    assert first["delta_hu"] == "-3.25"  # a number, not text: left as is
    assert last["noise.sigma_hu"] == "9.0"
    assert last["noise.method"] == ""  # absent in this job
    assert last["ok"] == "true"
    assert last["measurements.state"] == "shadowed"
    assert last["state"] == "succeeded"
    # text that a spreadsheet would run as a formula is quoted
    assert failed["error"] == '\'=HYPERLINK("http://evil","x")'
    assert failed["error_code"] == "pipeline_failed"
    assert last["label"] == "'-cmd|' /C calc'!A0"
    assert queued["error"] == ""


def test_empty_cohort(url: str) -> None:
    tenant_id, _ = _tenant_with_series(url, "a", 0)
    cohort_id, _ = _cohort(url, tenant_id, [], [])
    with session_scope(url) as s:
        r = cohort_rollup(s, tenant_id, cohort_id)
        text = cohort_csv(s, tenant_id, cohort_id)
        assert s.get(Cohort, cohort_id) is not None
    assert r["total"] == 0
    assert r["progress"] == 0.0
    assert r["done"] is False
    assert r["job_ids"] == []
    assert text == ",".join(CSV_COLUMNS) + "\r\n"


def test_other_tenants_cohort_is_not_found(url: str) -> None:
    tenant_a, series_a = _tenant_with_series(url, "a", 1)
    tenant_b, _ = _tenant_with_series(url, "bb", 0)
    cohort_id, _ = _cohort(url, tenant_a, series_a, [{"state": "queued"}])
    with session_scope(url) as s:
        for fn in (cohort_rollup, cohort_csv):
            with pytest.raises(NotFound):
                fn(s, tenant_b, cohort_id)
            with pytest.raises(NotFound):
                fn(s, tenant_a, "0" * 32)
        assert cohort_rollup(s, tenant_a, cohort_id)["total"] == 1


def test_jobs_of_another_tenant_never_join_a_cohort(url: str) -> None:
    tenant_a, series_a = _tenant_with_series(url, "a", 1)
    tenant_b, series_b = _tenant_with_series(url, "bb", 1)
    cohort_id, _ = _cohort(url, tenant_a, series_a, [{"state": "queued"}])
    with session_scope(url) as s:  # a row pointing at a's cohort but owned by b
        s.add(
            Job(
                tenant_id=tenant_b,
                cohort_id=cohort_id,
                series_id=series_b[0],
                pipeline="zeroshot-denoise",
                pipeline_version="1.0.0",
                queue="cpu",
                state="failed",
                error="secret of b",
            )
        )
    with session_scope(url) as s:
        r = cohort_rollup(s, tenant_a, cohort_id)
        text = cohort_csv(s, tenant_a, cohort_id)
    assert r["total"] == 1
    assert "secret of b" not in text
