"""Audit log against real SQLite and PostgreSQL stores."""

from __future__ import annotations

import pytest

from service.store import audit
from service.store.db import session_scope
from service.store.tables import AuditEvent, Tenant


@pytest.fixture
def url(store_settings) -> str:  # type: ignore[no-untyped-def]
    return store_settings.resolved_database_url


def _tenants(url: str) -> tuple[str, str]:
    with session_scope(url) as s:
        a, b = Tenant(name="a"), Tenant(name="b")
        s.add_all([a, b])
        s.flush()
        return a.id, b.id


def test_events_are_listed_newest_first_per_tenant(url: str) -> None:
    a, b = _tenants(url)
    with session_scope(url) as s:
        audit.record(
            s,
            tenant_id=a,
            key_id="k" * 16,
            action="upload",
            resource="study",
            resource_id="s1",
            detail={"bytes": 1024, "instances": 20},
        )
        audit.record(
            s,
            tenant_id=a,
            key_id="k" * 16,
            action="submit",
            resource="job",
            resource_id="j1",
            detail={"pipeline": "zeroshot-denoise"},
        )
        audit.record(
            s, tenant_id=b, key_id="q" * 16, action="download", resource="output", resource_id="j9"
        )
        audit.record(s, tenant_id=a, key_id="", action="delete", resource="study", resource_id="s1")
    with session_scope(url) as s:
        events = audit.list_events(s, a)
        assert [e.action for e in events] == ["delete", "submit", "upload"]
        assert events[2].detail == {"bytes": 1024, "instances": 20}
        assert events[2].key_id == "k" * 16
        assert events[1].resource == "job"
        assert events[1].resource_id == "j1"
        assert [e.action for e in audit.list_events(s, a, limit=2)] == ["delete", "submit"]
        assert [e.resource_id for e in audit.list_events(s, a, action="upload")] == ["s1"]
        assert [e.tenant_id for e in audit.list_events(s, b)] == [b]
        assert audit.list_events(s, "0" * 32) == []


def test_event_rolls_back_with_the_audited_change(url: str) -> None:
    a, _ = _tenants(url)

    def failed_upload() -> None:
        with session_scope(url) as s:
            audit.record(
                s, tenant_id=a, key_id="", action="upload", resource="study", resource_id="s1"
            )
            raise RuntimeError("ingest failed")

    with pytest.raises(RuntimeError):
        failed_upload()
    with session_scope(url) as s:
        assert s.query(AuditEvent).count() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"action": "hack"}, "unknown audit action"),
        ({"detail": {"patient_id": "x"}}, "not allowed"),
        ({"detail": {"PatientName": "x"}}, "not allowed"),
        ({"detail": {"filename": "x"}}, "not allowed"),
        ({"detail": {"series": {"nested": 1}}}, "scalar"),
        ({"resource": "r" * 17}, "out of bounds"),
        ({"resource_id": "r" * 65}, "out of bounds"),
    ],
)
def test_non_id_data_is_refused(url: str, kwargs: dict, message: str) -> None:
    a, _ = _tenants(url)
    base = {
        "tenant_id": a,
        "key_id": "",
        "action": "upload",
        "resource": "study",
        "resource_id": "s1",
    }
    with session_scope(url) as s:
        with pytest.raises(ValueError, match=message):
            audit.record(s, **(base | kwargs))
        assert s.query(AuditEvent).count() == 0
