"""STOW-RS answers (partial failure, 409, 503) from a real HTTP server on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest

from service.dicom.config import Node
from service.dicom.dicomweb import _batches, stow_instances
from service.errors import PeerFailed, PeerUnreachable

FAILED_SOP = "00081198"
REFERENCED_SOP = "00081199"
SOP_UID = "00081155"
FAILURE_REASON = "00081197"


class _Stow(BaseHTTPRequestHandler):
    """Answers each POST with the next (status, body) of ``server.script``."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else self._read_chunked()
        self.server.bodies.append(body)  # type: ignore[attr-defined]
        status, answer = self.server.script.pop(0)  # type: ignore[attr-defined]
        payload = json.dumps(answer(body) if callable(answer) else answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _read_chunked(self) -> bytes:
        data = b""
        while True:
            size = int(self.rfile.readline().strip(), 16)
            if size == 0:
                self.rfile.readline()
                return data
            data += self.rfile.read(size)
            self.rfile.readline()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Stow)
    httpd.script = []  # type: ignore[attr-defined]
    httpd.bodies = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _node(httpd: ThreadingHTTPServer) -> Node:
    return Node(
        name="web",
        dicomweb_url=f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web",
        send_via="dicomweb",
        retrieve_via="dicomweb",
    )


def _item(uid: str, reason: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {SOP_UID: {"vr": "UI", "Value": [uid]}}
    if reason is not None:
        item[FAILURE_REASON] = {"vr": "US", "Value": [reason]}
    return item


def _uids(files: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]


def test_partial_failure_and_unmentioned(server: ThreadingHTTPServer, ct3_dir: Path) -> None:
    files = sorted(ct3_dir.glob("*.dcm"))
    a, b, _c = _uids(files)
    server.script.append(  # type: ignore[attr-defined]
        (
            202,
            {
                REFERENCED_SOP: {"vr": "SQ", "Value": [_item(a)]},
                FAILED_SOP: {"vr": "SQ", "Value": [_item(b, 0xA700)]},
            },
        )
    )
    outcome = stow_instances(_node(server), files)
    assert outcome.stored == [a]
    assert outcome.failed[b] == "failure reason 0xA700"
    assert len(outcome.failed) == 2  # the third was not mentioned: counted as failed
    assert not outcome.ok


def test_409_carries_per_instance_failures(server: ThreadingHTTPServer, ct3_dir: Path) -> None:
    files = sorted(ct3_dir.glob("*.dcm"))[:1]
    (a,) = _uids(files)
    server.script.append(  # type: ignore[attr-defined]
        (409, {FAILED_SOP: {"vr": "SQ", "Value": [_item(a, 0xC122)]}})
    )
    outcome = stow_instances(_node(server), files)
    assert outcome.http_status == 409
    assert outcome.failed == {a: "failure reason 0xC122"}


def test_503_is_unreachable_and_400_is_failed(server: ThreadingHTTPServer, ct3_dir: Path) -> None:
    files = sorted(ct3_dir.glob("*.dcm"))[:1]
    server.script.append((503, {}))  # type: ignore[attr-defined]
    with pytest.raises(PeerUnreachable, match="503"):
        stow_instances(_node(server), files)
    server.script.append((400, {}))  # type: ignore[attr-defined]
    with pytest.raises(PeerFailed, match="400") as info:
        stow_instances(_node(server), files)
    assert not isinstance(info.value, PeerUnreachable)


def test_batches_bound_request_size(tmp_path: Path) -> None:
    paths = []
    for n, size in enumerate([40, 40, 40, 100, 10]):
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(b"x" * size)
        paths.append(path)
    sizes = [[p.stat().st_size for p in batch] for batch in _batches(paths, 90)]
    assert sizes == [[40, 40], [40], [100], [10]]
