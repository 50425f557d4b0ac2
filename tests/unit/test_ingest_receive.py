"""receive_upload behind a real Starlette app: multipart, raw bodies, zips and size limits."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tempfile
import warnings
import zipfile
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

with warnings.catch_warnings():  # starlette 1.x: "use httpx2" notice, irrelevant here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from models.errors import InputRejected, VoxelgateError
from service.errors import PayloadTooLarge
from service.ingest.receive import receive_upload, safe_file_name
from service.ingest.scan import upload_label
from service.settings import Settings

MiB = 1024 * 1024


def _app(settings: Settings, staging_root: Path) -> Starlette:
    """A tiny app: POST /upload receives into a fresh staging folder and lists what it got."""

    async def upload(request: Request) -> JSONResponse:
        staging = Path(tempfile.mkdtemp(dir=staging_root))
        try:
            files = await receive_upload(request, staging, settings)
        except VoxelgateError as exc:
            status = 413 if isinstance(exc, PayloadTooLarge) else 400
            return JSONResponse({"code": exc.code, "reason": str(exc)}, status_code=status)
        return JSONResponse(
            {
                "files": [upload_label(f) for f in files],
                "sha256": [hashlib.sha256(f.read_bytes()).hexdigest() for f in files],
                "inside": all(staging in f.parents for f in files),
            }
        )

    return Starlette(routes=[Route("/upload", upload, methods=["POST"])])


@pytest.fixture
def make_client(tmp_path):  # type: ignore[no-untyped-def]
    def make(**limits: float) -> tuple[TestClient, Path]:
        root = tmp_path / f"staging{len(list(tmp_path.iterdir()))}"
        root.mkdir()
        settings = Settings(data_dir=tmp_path / "vg", **limits)
        return TestClient(_app(settings, root)), root

    return make


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _staged_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_multipart_with_several_files_and_a_zip(make_client, ct3_dir, example_ct_dir):
    client, _ = make_client()
    ct3 = sorted(ct3_dir.iterdir())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(example_ct_dir.iterdir())[:2]:
            zf.write(p, f"series/{p.name}")
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in ct3]
    files.append(("files", ("../../ex.zip", buffer.getvalue(), "application/zip")))
    response = client.post("/upload", files=files, data={"modality": "CT"})
    assert response.status_code == 200, response.text
    body = response.json()
    names = [p.name for p in sorted(example_ct_dir.iterdir())[:2]]
    assert body["files"] == [p.name for p in ct3] + [f"ex.zip/series/{n}" for n in names]
    expected = [_sha(p) for p in ct3] + [_sha(example_ct_dir / n) for n in names]
    assert body["sha256"] == expected
    assert body["inside"]


def test_raw_zip_body_and_raw_dicom_with_names(make_client, ct3_dir):
    client, _ = make_client()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for p in sorted(ct3_dir.iterdir()):
            zf.write(p, p.name)
    response = client.post(
        "/upload", content=buffer.getvalue(), headers={"Content-Type": "application/zip"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["files"] == [
        "upload.zip/01.dcm",
        "upload.zip/02.dcm",
        "upload.zip/03.dcm",
    ]
    one = sorted(ct3_dir.iterdir())[0]
    response = client.post(
        "/upload",
        content=one.read_bytes(),
        headers={
            "Content-Type": "application/dicom",
            "Content-Disposition": 'attachment; filename="slice one.dcm"',
        },
    )
    assert response.json()["files"] == ["slice one.dcm"]
    response = client.post(
        "/upload?filename=x/y.dcm",
        content=one.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.json()["files"] == ["y.dcm"]
    assert response.json()["sha256"] == [_sha(one)]


def test_upload_over_the_limit_is_refused(make_client):
    client, root = make_client(max_upload_bytes=2 * MiB)
    response = client.post(
        "/upload", content=bytes(3 * MiB), headers={"Content-Type": "application/octet-stream"}
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    assert _staged_bytes(root) == 0  # refused from Content-Length, nothing read

    def body():  # type: ignore[no-untyped-def]
        for _ in range(48):
            yield bytes(64 * 1024)  # 3 MiB, chunked: no Content-Length

    response = client.post(
        "/upload", content=body(), headers={"Content-Type": "application/octet-stream"}
    )
    assert response.status_code == 413, response.text
    assert _staged_bytes(root) <= 2 * MiB  # stopped while streaming
    files = [("f", (f"{n}.dcm", bytes(MiB), "application/dicom")) for n in range(3)]
    response = client.post("/upload", files=files)
    assert response.status_code == 413


def test_size_limit_stops_reading_the_stream(tmp_path):
    """Drive receive_upload with an ASGI receive callable that counts what was pulled."""
    settings = Settings(data_dir=tmp_path / "vg", max_upload_bytes=4 * MiB)
    pulled = 0

    head = b'--xyz\r\nContent-Disposition: form-data; name="f"; filename="big.dcm"\r\n\r\n'

    async def receive():  # type: ignore[no-untyped-def]
        nonlocal pulled
        pulled += 1
        body = head if pulled == 1 else bytes(MiB)
        return {"type": "http.request", "body": body, "more_body": pulled < 1000}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/upload",
        "headers": [(b"content-type", b"multipart/form-data; boundary=xyz")],
        "query_string": b"",
    }
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(PayloadTooLarge):
        asyncio.run(receive_upload(Request(scope, receive), staging, settings))
    assert pulled == 5  # header + 3 MiB accepted, the 5th pull passes the limit; 995 never pulled
    assert sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) <= 4 * MiB


def test_bad_bodies_are_refused(make_client, tmp_path, ct3_dir):
    client, _ = make_client()
    one = sorted(ct3_dir.iterdir())[0].read_bytes()
    cases = [
        ({"Content-Type": "application/json"}, b"{}", "unsupported Content-Type"),
        ({"Content-Type": "multipart/form-data"}, b"--x\r\n", "without a boundary"),
        (
            {"Content-Type": "multipart/form-data; boundary=xyz"},
            b'--xyz\r\nContent-Disposition: form-data; name="f"; filename="a.dcm"\r\n\r\n' + one,
            "truncated multipart",
        ),
        ({"Content-Type": "application/zip"}, b"PK\x03\x04" + one[:5000], "truncated or corrupt"),
        ({"Content-Type": "application/zip"}, b"plain text", "truncated or corrupt"),
    ]
    for headers, content, reason in cases:
        response = client.post("/upload", content=content, headers=headers)
        assert response.status_code == 400, (reason, response.text)
        assert reason in response.json()["reason"]
    traversal = io.BytesIO()
    with zipfile.ZipFile(traversal, "w") as zf:
        zf.writestr("../../outside.dcm", one)
    response = client.post(
        "/upload", files=[("f", ("t.zip", traversal.getvalue(), "application/zip"))]
    )
    assert response.status_code == 400
    assert "unsafe zip member" in response.json()["reason"]
    assert not list(tmp_path.rglob("outside.dcm"))
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", bytes(32 * MiB))
    response = client.post(
        "/upload", content=bomb.getvalue(), headers={"Content-Type": "application/zip"}
    )
    assert response.status_code == 413
    assert "zip bomb" in response.json()["reason"]


def test_empty_multipart_is_refused(make_client):
    client, _ = make_client()
    response = client.post("/upload", data={"only": "a field"}, files=[])
    assert response.status_code == 400


def test_safe_file_name():
    assert safe_file_name("../../etc/passwd") == "passwd"
    assert safe_file_name("C:\\Users\\x\\scan.dcm") == "scan.dcm"
    assert safe_file_name("..") == "upload"
    assert safe_file_name(".hidden\x00.dcm") == "hidden.dcm"
    assert len(safe_file_name("a" * 500)) == 200


def test_input_rejected_is_a_voxelgate_error():
    assert issubclass(InputRejected, VoxelgateError)
