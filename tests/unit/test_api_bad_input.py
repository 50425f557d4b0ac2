"""Bad input through the HTTP API: each refusal is a 4xx with a JSON reason, and nothing stored
before is altered (studies listed, instance rows, blob files, staging area all unchanged).

The app runs in-process (``TestClient``) on the default single-machine settings (SQLite, the
embedded SQLAlchemy broker; no worker, so jobs stay queued) with small ingest limits so that
oversized uploads and zip bombs are quick to build.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from service.api.app import create_app
from service.settings import Settings
from service.store.auth import create_api_key, create_tenant
from service.store.db import session_scope
from service.store.tables import Instance, Job, Series, Study, now
from tests.conftest import CT_3SLICE, SHARED_DATA, require_path

MiB = 1024 * 1024
MAX_UPLOAD = 16 * MiB
MAX_EXPANDED = 10 * MiB
NIFTI = SHARED_DATA / "totalsegmentator" / "example_ct_sm.nii.gz"
PIPELINE = "zeroshot-denoise"
PARAMS = {"max_iterations": 20, "min_iterations": 0, "crop_size": 32, "batch_size": 2}


# -- fixtures and helpers --------------------------------------------------------------------
@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "vg-data",
        max_upload_bytes=MAX_UPLOAD,
        max_expanded_bytes=MAX_EXPANDED,
    )


@dataclass
class Gateway:
    """The app with one tenant's key and one stored study (the real 3-slice CT)."""

    client: TestClient
    settings: Settings
    headers: dict[str, str]
    study_id: str
    series_id: str

    @property
    def blob_root(self) -> Path:
        return Path(self.client.app.state.blobs.root)  # type: ignore[attr-defined]

    def post(self, url: str, **kw: Any) -> Any:
        return self.client.post(url, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def get(self, url: str) -> Any:
        return self.client.get(url, headers=self.headers)

    def delete(self, url: str) -> Any:
        return self.client.delete(url, headers=self.headers)

    def job(self, **target: Any) -> dict[str, Any]:
        body = {"pipeline": PIPELINE, "params": PARAMS, **target}
        response = self.post("/jobs", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def upload(self, paths: list[Path]) -> dict[str, Any]:
        response = self.post("/studies", files=parts(paths))
        assert response.status_code == 201, response.text
        return dict(response.json())


def parts(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/dicom")) for p in paths]


def ct_paths() -> list[Path]:
    return sorted(require_path(CT_3SLICE).glob("*.dcm"))


@pytest.fixture
def gw(settings: Settings) -> Iterator[Gateway]:
    with TestClient(create_app(settings, run_reaper=False)) as client:
        with session_scope(settings.resolved_database_url) as session:
            key = create_api_key(session, create_tenant(session, "hospital-a").id)
        headers = {"Authorization": f"Bearer {key}"}
        response = client.post("/studies", files=parts(ct_paths()), headers=headers)
        assert response.status_code == 201, response.text
        study = response.json()["studies"][0]
        yield Gateway(client, settings, headers, study["id"], study["series"][0]["id"])


def state(gw: Gateway) -> dict[str, Any]:
    """What must not change when an upload is refused."""
    studies = gw.get("/studies")
    assert studies.status_code == 200
    with session_scope(gw.settings.resolved_database_url) as session:
        counts = {
            table.__name__: session.scalar(select(func.count()).select_from(table))
            for table in (Study, Series, Instance, Job)
        }
    files = {
        p.relative_to(gw.blob_root).as_posix(): p.stat().st_size
        for p in (gw.blob_root / "studies").rglob("*")
        if p.is_file()
    }
    return {"studies": studies.json(), "rows": counts, "blobs": files}


def staging_is_empty(gw: Gateway) -> bool:
    return not any((gw.blob_root / "staging").iterdir())


def assert_error(response: Any, status: int, code: str, *needles: str) -> str:
    """The response is ``status`` with ``{"error": {"code": code, "message": ...}}``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    message = body["error"]["message"]
    assert isinstance(message, str)
    assert len(message) > 10, f"no reason given: {message!r}"
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return str(message)


def assert_refused_upload(gw: Gateway, before: dict[str, Any], response: Any, status: int,
                          code: str, *needles: str) -> str:  # fmt: skip
    message = assert_error(response, status, code, *needles)
    assert state(gw) == before, "a refused upload altered the store"
    assert staging_is_empty(gw), "the refused upload left files in the staging area"
    return message


def fresh_ct(folder: Path, patient_id: str | None = None) -> list[Path]:
    """The 3 real CT slices as a new study (new UIDs), optionally with another PatientID."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for path in ct_paths():
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if patient_id is not None:
            ds.PatientID = patient_id
        target = folder / path.name
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def zip_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return buffer.getvalue()


def patch_sizes(data: bytes, new_size: int) -> bytes:
    """Rewrite the declared uncompressed size of every member (local headers + central dir)."""
    raw = bytearray(data)
    pos = 0
    while (pos := raw.find(b"PK\x03\x04", pos)) != -1:
        raw[pos + 22 : pos + 26] = new_size.to_bytes(4, "little")
        pos += 4
    pos = 0
    while (pos := raw.find(b"PK\x01\x02", pos)) != -1:
        raw[pos + 24 : pos + 28] = new_size.to_bytes(4, "little")
        pos += 4
    return bytes(raw)


def post_zip(gw: Gateway, data: bytes, name: str = "study.zip", raw: bool = False) -> Any:
    if raw:
        return gw.post("/studies", content=data, headers={"Content-Type": "application/zip"})
    return gw.post("/studies", files=[("files", (name, data, "application/zip"))])


# -- uploads ---------------------------------------------------------------------------------
def test_non_dicom_file_refuses_the_whole_upload(gw: Gateway, tmp_path: Path) -> None:
    before = state(gw)
    files = parts(fresh_ct(tmp_path / "new"))
    files.insert(1, ("files", ("notes.txt", b"not an image at all\n" * 20, "text/plain")))
    response = gw.post("/studies", files=files)
    assert_refused_upload(gw, before, response, 422, "input_rejected", "notes.txt")


def test_truncated_zip_is_refused(gw: Gateway, tmp_path: Path) -> None:
    before = state(gw)
    data = zip_bytes({p.name: p.read_bytes() for p in fresh_ct(tmp_path / "new")})
    for cut in (data[: len(data) // 2], data[:-30]):
        for raw in (False, True):
            response = post_zip(gw, cut, raw=raw)
            assert_refused_upload(gw, before, response, 422, "input_rejected", "zip")


def test_zip_bomb_by_declared_total_size(gw: Gateway) -> None:
    before = state(gw)
    # 11 honest, incompressible 1 MiB members: 11 MiB declared > 10 MiB allowed.
    members = {f"m{i:02d}.dcm": os.urandom(MiB) for i in range(11)}
    response = post_zip(gw, zip_bytes(members, zipfile.ZIP_STORED))
    assert_refused_upload(gw, before, response, 413, "payload_too_large", "declared")


def test_zip_bomb_by_compression_ratio(gw: Gateway) -> None:
    before = state(gw)
    data = zip_bytes({"zeros.dcm": bytes(8 * MiB)})  # ~1000-fold, under the total limit
    assert len(data) < 64 * 1024
    response = post_zip(gw, data)
    assert_refused_upload(gw, before, response, 413, "payload_too_large", "zip bomb")


def test_zip_bomb_with_understated_sizes(gw: Gateway) -> None:
    """Headers claim 512 KiB per member, the data expands to 12 MiB: refused without filling
    the disk (zipfile stops at the declared size and the CRC no longer matches)."""
    before = state(gw)
    data = patch_sizes(zip_bytes({"a.dcm": bytes(12 * MiB)}), 512 * 1024)
    response = post_zip(gw, data)
    assert response.status_code in (413, 422), response.text
    code = {413: "payload_too_large", 422: "input_rejected"}[response.status_code]
    assert_refused_upload(gw, before, response, response.status_code, code, "study.zip")


def test_zip_bomb_by_actual_size_across_archives(gw: Gateway) -> None:
    """Two archives, each within the limit, together over it: the budget is per upload."""
    before = state(gw)
    archive = zip_bytes({f"m{i}.dcm": os.urandom(MiB) for i in range(6)}, zipfile.ZIP_STORED)
    files = [("files", (f"part{i}.zip", archive, "application/zip")) for i in range(2)]
    response = gw.post("/studies", files=files)
    assert_refused_upload(gw, before, response, 413, "payload_too_large")


@pytest.mark.parametrize(
    "member", ["../../etc/x.dcm", "ok/../../../x.dcm", "/tmp/voxelgate-abs-x.dcm", "C:/x.dcm"]
)
def test_path_traversal_in_archive_is_refused(gw: Gateway, tmp_path: Path, member: str) -> None:
    before = state(gw)
    good = fresh_ct(tmp_path / "new")
    members = {p.name: p.read_bytes() for p in good[:2]}
    members[member] = good[2].read_bytes()
    response = post_zip(gw, zip_bytes(members))
    assert_refused_upload(gw, before, response, 422, "input_rejected", "unsafe")
    assert not list(tmp_path.rglob("x.dcm")), "a member was written outside the staging area"
    assert not Path("/tmp/voxelgate-abs-x.dcm").exists()


def test_symlink_member_is_refused(gw: Gateway, tmp_path: Path) -> None:
    before = state(gw)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in fresh_ct(tmp_path / "new")[:2]:
            archive.write(path, path.name)
        link = zipfile.ZipInfo("link.dcm")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    response = post_zip(gw, buffer.getvalue())
    assert_refused_upload(gw, before, response, 422, "input_rejected", "symbolic link")


def test_upload_over_the_size_limit_is_413(gw: Gateway) -> None:
    before = state(gw)
    blob = os.urandom(MAX_UPLOAD + MiB)
    multipart = gw.post("/studies", files=[("files", ("big.dcm", blob, "application/dicom"))])
    assert_refused_upload(gw, before, multipart, 413, "payload_too_large", str(MAX_UPLOAD))
    raw = gw.post("/studies", content=blob, headers={"Content-Type": "application/octet-stream"})
    assert_refused_upload(gw, before, raw, 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted while streaming
        for start in range(0, len(blob), MiB):
            yield blob[start : start + MiB]

    streamed = gw.post(
        "/studies", content=chunks(), headers={"Content-Type": "application/octet-stream"}
    )
    assert_refused_upload(gw, before, streamed, 413, "payload_too_large")


def _patient_strings() -> set[str]:
    ds = pydicom.dcmread(ct_paths()[0], stop_before_pixels=True)
    return {str(ds.PatientName), str(ds.PatientID)}


def test_mixed_patients_in_one_upload_are_refused(gw: Gateway, tmp_path: Path) -> None:
    before = state(gw)
    other_id = "OTHER-PATIENT-4711"
    # The stored instances with one file's PatientID changed, and a new study likewise.
    stored = tmp_path / "stored"
    stored.mkdir()
    changed = []
    for i, path in enumerate(ct_paths()):
        ds = pydicom.dcmread(path)
        if i == 1:
            ds.PatientID = other_id
        ds.save_as(stored / path.name)
        changed.append(stored / path.name)
    fresh = fresh_ct(tmp_path / "fresh")
    odd = fresh_ct(tmp_path / "odd", patient_id=other_id)[0].rename(tmp_path / "odd" / "04.dcm")
    for upload in (changed, [*fresh[:2], odd]):
        response = gw.post("/studies", files=parts(upload))
        message = assert_refused_upload(gw, before, response, 422, "input_rejected", "patients")
        assert upload[1].name in message or upload[2].name in message, "no file named"
        for secret in {*_patient_strings(), other_id}:
            assert secret not in message, "the refusal names a patient attribute"


def test_other_patient_under_a_stored_study_uid_is_refused(gw: Gateway, tmp_path: Path) -> None:
    before = state(gw)
    folder = tmp_path / "impostor"
    folder.mkdir()
    uploads = []
    for path in ct_paths():  # same StudyInstanceUID as the stored study, new instances
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName = "SOMEONE-ELSE", "Doe^Jane"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / path.name)
        uploads.append(folder / path.name)
    response = gw.post("/studies", files=parts(uploads))
    message = assert_refused_upload(gw, before, response, 422, "input_rejected")
    assert "SOMEONE-ELSE" not in message
    assert "Doe" not in message


def test_corrupt_dicom_and_empty_upload_are_refused(gw: Gateway, tmp_path: Path) -> None:
    before = state(gw)
    good = fresh_ct(tmp_path / "new")
    truncated = good[2].read_bytes()[:4096]
    files = [*parts(good[:2]), ("files", ("03.dcm", truncated, "application/dicom"))]
    assert_refused_upload(gw, before, gw.post("/studies", files=files), 422, "input_rejected")
    empty = gw.post("/studies", data={"note": "no file here"}, files=[])
    assert 400 <= empty.status_code < 500, empty.text
    assert state(gw) == before
    wrong_type = gw.post("/studies", content=b"{}", headers={"Content-Type": "application/json"})
    assert_refused_upload(gw, before, wrong_type, 422, "input_rejected", "Content-Type")


def test_good_upload_after_refusals_still_works(gw: Gateway, tmp_path: Path) -> None:
    post_zip(gw, zip_bytes({"zeros.dcm": bytes(8 * MiB)}))
    gw.post("/studies", files=[("files", ("x.txt", b"junk" * 100, "text/plain"))])
    fresh = fresh_ct(tmp_path / "new")
    data = zip_bytes({f"CT/{p.name}": p.read_bytes() for p in fresh})
    response = post_zip(gw, data, raw=True)
    assert response.status_code == 201, response.text
    assert response.json()["instances_stored"] == 3
    nifti = require_path(NIFTI).read_bytes()
    response = gw.post("/studies", files=[("files", (NIFTI.name, nifti, "application/gzip"))])
    assert response.status_code == 201, response.text
    assert len(gw.get("/studies").json()["studies"]) == 3
    assert staging_is_empty(gw)


# -- jobs ------------------------------------------------------------------------------------
def _jobs(gw: Gateway) -> list[dict[str, Any]]:
    return list(gw.get("/jobs").json()["jobs"])


def test_unknown_pipeline_is_422_with_suggestion(gw: Gateway) -> None:
    before = _jobs(gw)
    for url, body in (
        ("/jobs", {"series_id": gw.series_id, "pipeline": "zeroshot-denoize"}),
        ("/cohorts", {"items": [{"series_id": gw.series_id}], "pipeline": "zeroshot-denoize"}),
    ):
        response = gw.post(url, json=body)
        assert_error(response, 422, "unknown_pipeline", "did you mean 'zeroshot-denoise'")
    assert _jobs(gw) == before


@pytest.mark.parametrize(
    ("params", "needles"),
    [
        ({"max_iteration": 50}, ("max_iteration", "did you mean 'max_iterations'")),
        ({"max_iterations": 5}, ("max_iterations",)),
        ({"max_iterations": 10**9}, ("max_iterations",)),
        ({"method": "magic"}, ("method",)),
        ({"crop_size": "big"}, ("crop_size",)),
        ({"learning_rate": -1.0}, ("learning_rate",)),
    ],
)
def test_invalid_parameters_are_422_naming_the_key(
    gw: Gateway, params: dict[str, Any], needles: tuple[str, ...]
) -> None:
    before = _jobs(gw)
    for url, target in (("/jobs", {"series_id": gw.series_id}),
                        ("/cohorts", {"items": [{"series_id": gw.series_id}]})):  # fmt: skip
        response = gw.post(url, json={**target, "pipeline": PIPELINE, "params": params})
        assert_error(response, 422, "invalid_parameters", *needles)
    assert _jobs(gw) == before


@pytest.mark.parametrize("priority", [10, -1, "urgent", 2.5])
def test_invalid_priority_is_422(gw: Gateway, priority: Any) -> None:
    before = _jobs(gw)
    body = {"series_id": gw.series_id, "pipeline": PIPELINE, "priority": priority}
    assert_error(gw.post("/jobs", json=body), 422, "invalid_request", "priority")
    body = {"items": [{"study_id": gw.study_id}], "pipeline": PIPELINE, "priority": priority}
    assert_error(gw.post("/cohorts", json=body), 422, "invalid_request", "priority")
    assert _jobs(gw) == before


@pytest.mark.parametrize(
    "body",
    [
        {"pipeline": PIPELINE},
        {"series_id": "a" * 32, "study_id": "b" * 32, "pipeline": PIPELINE},
        {"series_id": "a" * 33, "pipeline": PIPELINE},
        {"series_id": "a" * 32, "pipeline": PIPELINE, "colour": "blue"},
        {"series_id": "a" * 32},
    ],
)
def test_malformed_job_request_is_422(gw: Gateway, body: dict[str, Any]) -> None:
    assert_error(gw.post("/jobs", json=body), 422, "invalid_request")


def test_non_json_job_body_is_a_json_error(gw: Gateway) -> None:
    response = gw.post("/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(response, 422, "invalid_request")


def test_unknown_ids_are_404_never_500(gw: Gateway) -> None:
    for url in ("/studies/" + "0" * 32, "/studies/nope", "/studies/" + "9" * 200,
                "/jobs/" + "0" * 32, "/jobs/" + "x" * 200, "/cohorts/" + "0" * 32,
                "/cohorts/" + "0" * 32 + "/results.csv", "/pipelines/nope"):  # fmt: skip
        assert_error(gw.get(url), 404, "not_found")
    assert_error(gw.delete("/studies/" + "0" * 32), 404, "not_found")
    assert_error(gw.delete("/jobs/" + "0" * 32), 404, "not_found")
    assert_error(gw.post("/jobs/" + "0" * 32 + "/retry"), 404, "not_found")
    response = gw.post("/jobs", json={"series_id": "0" * 32, "pipeline": PIPELINE})
    assert_error(response, 404, "not_found")
    response = gw.post("/cohorts", json={"items": [{"study_id": "0" * 32}], "pipeline": PIPELINE})
    assert_error(response, 404, "not_found")


def test_job_on_a_deleted_study_is_404(gw: Gateway, tmp_path: Path) -> None:
    uploaded = gw.upload(fresh_ct(tmp_path / "new"))
    study_id = uploaded["studies"][0]["id"]
    series_id = uploaded["studies"][0]["series"][0]["id"]
    old = gw.job(series_id=series_id)["id"]
    assert gw.delete(f"/jobs/{old}").status_code == 202
    assert gw.delete(f"/studies/{study_id}").status_code == 204
    before = _jobs(gw)

    assert_error(gw.post("/jobs", json={"series_id": series_id, "pipeline": PIPELINE}),
                 404, "not_found")  # fmt: skip
    assert_error(gw.post("/jobs", json={"study_id": study_id, "pipeline": PIPELINE}),
                 404, "not_found")  # fmt: skip
    body = {"items": [{"series_id": gw.series_id}, {"study_id": study_id}], "pipeline": PIPELINE}
    assert_error(gw.post("/cohorts", json=body), 404, "not_found")
    assert_error(gw.post(f"/jobs/{old}/retry"), 404, "not_found")
    assert _jobs(gw) == before, "a refused submission created jobs"
    assert_error(gw.get(f"/studies/{study_id}"), 404, "not_found")
    assert_error(gw.delete(f"/studies/{study_id}"), 404, "not_found")
    assert [s["id"] for s in gw.get("/studies").json()["studies"]] == [gw.study_id]
    # The earlier job keeps working references; the other study is untouched.
    assert gw.get(f"/jobs/{old}").json()["state"] == "cancelled"
    assert gw.get(f"/studies/{gw.study_id}").json()["instance_count"] == 3
    assert not (gw.blob_root / "studies" / study_id).exists()


def test_retry_of_a_queued_or_succeeded_job_is_409(gw: Gateway) -> None:
    queued = gw.job(series_id=gw.series_id)["id"]
    assert_error(gw.post(f"/jobs/{queued}/retry"), 409, "conflict", "queued")
    with session_scope(gw.settings.resolved_database_url) as session:
        session.execute(
            update(Job).where(Job.id == queued).values(state="succeeded", finished_at=now())
        )
    assert_error(gw.post(f"/jobs/{queued}/retry"), 409, "conflict", "succeeded")
    assert len(_jobs(gw)) == 1


def test_cancel_twice_is_409_the_second_time(gw: Gateway) -> None:
    job = gw.job(series_id=gw.series_id)["id"]
    first = gw.delete(f"/jobs/{job}")
    assert first.status_code == 202, first.text
    assert first.json()["state"] == "cancelled"
    assert_error(gw.delete(f"/jobs/{job}"), 409, "conflict", "cancelled")
    view = gw.get(f"/jobs/{job}").json()
    assert view["state"] == "cancelled"
    assert view["finished"] is True


def test_download_of_a_missing_output_is_404(gw: Gateway) -> None:
    job = gw.job(series_id=gw.series_id)["id"]
    assert_error(gw.get(f"/jobs/{job}/outputs/denoised.nii.gz"), 404, "not_found", "none yet")
    blobs = gw.client.app.state.blobs  # type: ignore[attr-defined]
    folder = blobs.job_outputs_dir(job)
    folder.mkdir(parents=True)
    (folder / "result.json").write_text('{"ok": true}')
    outputs = {"result.json": {"key": blobs.key_of(folder / "result.json"), "size": 12,
                               "sha256": "0" * 64, "media_type": "application/json"}}  # fmt: skip
    with session_scope(gw.settings.resolved_database_url) as session:
        session.execute(update(Job).where(Job.id == job).values(state="succeeded", outputs=outputs))
    assert gw.get(f"/jobs/{job}/outputs/result.json").json() == {"ok": True}
    assert_error(gw.get(f"/jobs/{job}/outputs/denoised.nii.gz"), 404, "not_found", "result.json")
    for name in ("..%2F..%2Fvoxelgate.db", "%2E%2E", "result.json%00"):
        response = gw.get(f"/jobs/{job}/outputs/{name}")
        assert response.status_code == 404, (name, response.status_code, response.text[:200])


def test_download_whose_blob_vanished_is_a_json_4xx(gw: Gateway) -> None:
    """An output recorded on the row whose file is gone (e.g. removed by an operator)."""
    job = gw.job(series_id=gw.series_id)["id"]
    blobs = gw.client.app.state.blobs  # type: ignore[attr-defined]
    key = blobs.key_of(blobs.job_outputs_dir(job) / "denoised.nii.gz")
    outputs = {"denoised.nii.gz": {"key": key, "size": 1, "sha256": "0" * 64,
                                   "media_type": "application/gzip"}}  # fmt: skip
    with session_scope(gw.settings.resolved_database_url) as session:
        session.execute(update(Job).where(Job.id == job).values(state="succeeded", outputs=outputs))
    client = TestClient(gw.client.app, raise_server_exceptions=False)
    response = client.get(f"/jobs/{job}/outputs/denoised.nii.gz", headers=gw.headers)
    assert_error(response, 404, "not_found")
