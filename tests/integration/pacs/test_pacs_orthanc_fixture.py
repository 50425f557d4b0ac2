"""The Orthanc fixture itself: loopback only, REST + DICOMweb up, custom modalities registered."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CT_3SLICE, require_path
from tests.integration.pacs.conftest import OrthancFactory
from tests.integration.pacs.orthanc import OrthancPeer, assert_loopback_only, listening_sockets

pytestmark = pytest.mark.integration


def test_orthanc_listens_on_loopback_only(orthanc: OrthancPeer) -> None:
    assert orthanc.proc is not None
    sockets = assert_loopback_only(orthanc.proc.pid)
    assert {orthanc.http_port, orthanc.dicom_port} <= {port for _, port in sockets}
    assert all(addr in ("127.0.0.1", "::1") for addr, _ in sockets)


def test_upload_and_dicomweb(orthanc: OrthancPeer) -> None:
    files = sorted(require_path(CT_3SLICE).glob("*.dcm"))
    ids = orthanc.upload(files)
    assert sorted(ids) == sorted(orthanc.instances())
    assert len(orthanc.studies()) == 1
    assert "dicom-web" in orthanc.rest("GET", "/plugins")


def test_factory_registers_modalities(orthanc_factory: OrthancFactory, tmp_path: Path) -> None:
    peer = orthanc_factory(modalities={"gateway": ("VOXELGATE", "127.0.0.1", 11112)})
    assert peer.rest("GET", "/modalities") == ["gateway"]
    pid = peer.proc.pid if peer.proc else 0
    peer.stop()
    assert peer.proc is None
    with pytest.raises(FileNotFoundError):
        listening_sockets(pid)


@pytest.mark.parametrize(
    ("hex_addr", "text"),
    [
        ("0100007F", "127.0.0.1"),
        ("00000000", "0.0.0.0"),
        ("00000000000000000000000001000000", "::1"),
        ("00000000000000000000000000000000", "::"),
    ],
)
def test_proc_net_addresses_decode(hex_addr: str, text: str) -> None:
    from tests.integration.pacs.orthanc import _decode_address

    assert _decode_address(hex_addr) == text


def test_wildcard_listener_would_be_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """assert_loopback_only refuses a process with a non-loopback listening socket.

    Binding a real wildcard socket is against the test rules, so the socket table is faked.
    """
    import tests.integration.pacs.orthanc as module

    monkeypatch.setattr(module, "listening_sockets", lambda pid: [("127.0.0.1", 1), ("0.0.0.0", 2)])
    with pytest.raises(module.OrthancError, match="beyond loopback"):
        module.assert_loopback_only(1)
