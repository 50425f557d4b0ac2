"""STOW-RS into our gateway (``POST /dicomweb/studies``): per-part outcome, statuses, routing.

In-process app (TestClient) on the embedded SQLite store; no worker runs, so routed jobs stay
queued and are checked in the job store.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from sqlalchemy import select

from service.api.app import create_app
from service.settings import Settings
from service.store.auth import create_api_key, create_tenant
from service.store.db import session_scope, upgrade_schema
from service.store.tables import AuditEvent, Instance, Job, Study
from tests.conftest import CT_3SLICE, require_path
from tests.integration.conftest import FAST_PARAMS

pytestmark = pytest.mark.integration

BOUNDARY = "vg-stow-boundary-7f3a"
CONFIG = """
[listener]
ae_title = "VOXELGATE"

[nodes.pacs]
ae_title = "ORTHANC"
port = 4242

[[rules]]
name = "stow-ct"
source = ["stow"]
modality = "CT"
pipeline = "zeroshot-denoise"
priority = 7
destinations = ["pacs"]
params = {params}
"""
REFERENCED = "00081199"
FAILED = "00081198"
SOP_INSTANCE = "00081155"
REASON = "00081197"


def _toml_table(values: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {v}" for k, v in values.items()) + " }"


@pytest.fixture
def stow(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], Settings]]:
    config = tmp_path / "dicom.toml"
    config.write_text(CONFIG.replace("{params}", _toml_table(FAST_PARAMS)))
    settings = Settings(data_dir=tmp_path / "vg", dicom_config=config, max_upload_bytes=20_000_000)
    upgrade_schema(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as s:
        key = create_api_key(s, create_tenant(s, "radiology").id)
    with TestClient(create_app(settings, run_reaper=False)) as client:
        yield client, {"Authorization": f"Bearer {key}"}, settings


def body(parts: list[tuple[str, bytes]]) -> bytes:
    chunks = [
        f"--{BOUNDARY}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
        for ctype, data in parts
    ]
    return b"".join(chunks) + f"--{BOUNDARY}--\r\n".encode()


def post(client: TestClient, headers: dict[str, str], data: bytes, path: str = "") -> Any:
    ctype = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    return client.post(
        f"/dicomweb/studies{path}", content=data, headers={**headers, "Content-Type": ctype}
    )


def ct_parts() -> list[tuple[str, bytes]]:
    return [
        ("application/dicom", p.read_bytes()) for p in sorted(require_path(CT_3SLICE).glob("*.dcm"))
    ]


def uids(answer: dict[str, Any], key: str) -> list[str]:
    return [item[SOP_INSTANCE]["Value"][0] for item in answer.get(key, {}).get("Value", [])]


def reasons(answer: dict[str, Any]) -> list[int]:
    return [item[REASON]["Value"][0] for item in answer.get(FAILED, {}).get("Value", [])]


def test_store_all_routes_and_answers_200(stow: Any) -> None:
    client, headers, settings = stow
    response = post(client, headers, body(ct_parts()))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    expected = [dcmread(p).SOPInstanceUID for p in sorted(CT_3SLICE.glob("*.dcm"))]
    assert uids(response.json(), REFERENCED) == expected
    assert FAILED not in response.json()
    with session_scope(settings.resolved_database_url) as s:
        study = s.scalars(select(Study)).one()
        assert study.source == "stow"
        assert s.query(Instance).count() == 3
        job = s.scalars(select(Job)).one()
        assert (job.pipeline, job.priority, job.deliver_to) == ("zeroshot-denoise", 7, ["pacs"])
        actions = sorted(e.action for e in s.scalars(select(AuditEvent)))
    assert actions == ["receive", "route"]
    view = client.get(f"/jobs/{job.id}", headers=headers).json()
    assert [(d["node"], d["state"]) for d in view["deliveries"]] == [("pacs", "waiting")]

    again = post(client, headers, body(ct_parts()))  # idempotent: nothing new, nothing routed
    assert again.status_code == 200
    assert uids(again.json(), REFERENCED) == expected
    with session_scope(settings.resolved_database_url) as s:
        assert s.query(Instance).count() == 3
        assert s.query(Job).count() == 1


def test_bad_parts_fail_alone_with_a_reason_202(stow: Any) -> None:
    client, headers, settings = stow
    good = ct_parts()
    truncated = good[2][1][: len(good[2][1]) // 2]
    parts = [good[0], ("application/dicom", b"not dicom"), ("text/plain", b"hello"), good[1]]
    response = post(client, headers, body([*parts, ("application/dicom", truncated)]))
    assert response.status_code == 202, response.text
    answer = response.json()
    assert len(uids(answer, REFERENCED)) == 2
    assert reasons(answer) == [0xC000, 0xC000, 0xC000]
    with session_scope(settings.resolved_database_url) as s:
        assert s.query(Instance).count() == 2


def test_nothing_stored_is_409(stow: Any) -> None:
    client, headers, settings = stow
    response = post(client, headers, body([("application/dicom", b"\0" * 200)]))
    assert response.status_code == 409
    assert reasons(response.json()) == [0xC000]
    other = post(client, headers, body(ct_parts()), path="/1.2.3.4.5")  # another study's URL
    assert other.status_code == 409
    assert reasons(other.json()) == [0x0110] * 3
    with session_scope(settings.resolved_database_url) as s:
        assert s.query(Instance).count() == 0


def test_study_url_accepts_its_own_instances(stow: Any) -> None:
    client, headers, _ = stow
    study_uid = dcmread(sorted(CT_3SLICE.glob("*.dcm"))[0]).StudyInstanceUID
    response = post(client, headers, body(ct_parts()), path=f"/{study_uid}")
    assert response.status_code == 200
    assert len(uids(response.json(), REFERENCED)) == 3


def test_media_type_key_and_size_limits(stow: Any) -> None:
    client, headers, settings = stow
    wrong = client.post(
        "/dicomweb/studies",
        content=b"x",
        headers={**headers, "Content-Type": "application/dicom"},
    )
    assert wrong.status_code == 415
    assert post(client, {}, body(ct_parts())).status_code == 401
    empty = post(client, headers, f"--{BOUNDARY}--\r\n".encode())
    assert empty.status_code == 422
    huge = post(client, headers, body([("application/dicom", b"\0" * 21_000_000)]))
    assert huge.status_code == 413
    with session_scope(settings.resolved_database_url) as s:
        assert s.query(Instance).count() == 0
