"""The C-STORE batch sender against a real pynetdicom storage SCP on loopback (in process)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from service.delivery.dimse import store_files
from service.delivery.errors import DeliveryFailed
from service.dicom.config import Node
from service.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Scp:
    """What the SCP received: (SOPInstanceUID, transfer syntax, pixels) per C-STORE."""

    port: int
    received: list[tuple[str, str, Any]] = field(default_factory=list)
    associations: int = 0
    refuse_uid: str = ""


def _start(syntaxes: list[str], refuse_uid: str = "") -> tuple[Scp, Any]:
    scp = Scp(_free_port(), refuse_uid=refuse_uid)
    ae = AE(ae_title="PEER")
    ae.require_called_aet = True
    ae.add_supported_context(CTImageStorage, syntaxes)

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        if ds.SOPInstanceUID == scp.refuse_uid:
            return 0xA700
        scp.received.append((ds.SOPInstanceUID, event.context.transfer_syntax, ds.pixel_array))
        return 0x0000

    def on_open(event: Any) -> None:
        scp.associations += 1

    server = ae.start_server(
        ("127.0.0.1", scp.port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_REQUESTED, on_open)],
    )
    return scp, server


@pytest.fixture
def peer() -> Iterator[Any]:
    servers: list[Any] = []

    def start(syntaxes: list[str], refuse_uid: str = "") -> Scp:
        scp, server = _start(syntaxes, refuse_uid)
        servers.append(server)
        return scp

    yield start
    for server in servers:
        server.shutdown()


def _node(port: int, ae_title: str = "PEER") -> Node:
    return Node(name="peer", ae_title=ae_title, host="127.0.0.1", port=port)


SETTINGS = Settings(dimse_timeout_s=10)


def _j2k_copies(ct3_dir: Path, dest: Path) -> list[Path]:
    """The real CT slices re-encoded as JPEG 2000 lossless, with new SOP Instance UIDs."""
    out = []
    for path in sorted(ct3_dir.glob("*.dcm"))[:2]:
        ds = dcmread(path)
        ds.compress(JPEG2000Lossless)  # generates a new SOPInstanceUID
        out.append(dest / f"j2k-{path.name}")
        ds.save_as(out[-1], enforce_file_format=True)
    return out


def test_one_association_transcodes_to_what_the_peer_accepts(
    peer: Any, ct3_dir: Path, tmp_path: Path
) -> None:
    files = sorted(ct3_dir.glob("*.dcm")) + _j2k_copies(ct3_dir, tmp_path)
    assert [dcmread(f).file_meta.TransferSyntaxUID for f in files[3:]] == [JPEG2000Lossless] * 2
    scp = peer([ExplicitVRLittleEndian])
    done: list[int] = []
    report = store_files(
        _node(scp.port), files, SETTINGS, calling_ae="VOXELGATE", progress=done.append
    )
    assert report.sent == 5
    assert report.failed == []
    assert report.associations == 1
    assert scp.associations == 1
    assert report.transcoded == {"reencode": 3, "decompress": 2}
    assert done == [1, 2, 3, 4, 5]
    assert {ts for _, ts, _ in scp.received} == {ExplicitVRLittleEndian}
    for path, (uid, _, pixels) in zip(files, scp.received, strict=True):
        source = dcmread(path)
        assert uid == source.SOPInstanceUID
        assert np.array_equal(pixels, source.pixel_array)


def test_stored_syntax_goes_as_is_when_accepted(peer: Any, ct3_dir: Path) -> None:
    scp = peer([ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    report = store_files(
        _node(scp.port), sorted(ct3_dir.glob("*.dcm")), SETTINGS, calling_ae="VOXELGATE"
    )
    assert report.sent == 3
    assert report.transcoded == {}
    assert {ts for _, ts, _ in scp.received} == {ImplicitVRLittleEndian}


def test_rle_only_peer_gets_rle(peer: Any, ct3_dir: Path) -> None:
    scp = peer([RLELossless])
    report = store_files(
        _node(scp.port), sorted(ct3_dir.glob("*.dcm")), SETTINGS, calling_ae="VOXELGATE"
    )
    assert report.sent == 3
    assert report.transcoded == {"compress": 3}
    assert {ts for _, ts, _ in scp.received} == {RLELossless}


def test_failure_status_is_reported_per_instance(peer: Any, ct3_dir: Path) -> None:
    files = sorted(ct3_dir.glob("*.dcm"))
    refused = dcmread(files[1]).SOPInstanceUID
    scp = peer([ImplicitVRLittleEndian], refuse_uid=refused)
    report = store_files(_node(scp.port), files, SETTINGS, calling_ae="VOXELGATE")
    assert report.sent == 2
    assert report.failed == [(1, 0xA700)]


def test_refused_or_unreachable_peer_is_a_retryable_failure(peer: Any, ct3_dir: Path) -> None:
    files = sorted(ct3_dir.glob("*.dcm"))
    scp = peer([ImplicitVRLittleEndian])
    with pytest.raises(DeliveryFailed, match="rejected") as rejected:
        store_files(_node(scp.port, "WRONG"), files, SETTINGS, calling_ae="VOXELGATE")
    assert rejected.value.retry
    with pytest.raises(DeliveryFailed, match="no association") as down:
        store_files(_node(_free_port()), files, SETTINGS, calling_ae="VOXELGATE")
    assert down.value.retry
    assert scp.received == []


def test_a_file_that_is_not_dicom_is_not_retried(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(DeliveryFailed) as caught:
        store_files(_node(_free_port()), [junk], SETTINGS, calling_ae="VOXELGATE")
    assert not caught.value.retry
