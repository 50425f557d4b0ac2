"""`voxelgate scp` under bad input: malformed data sets, aborts, duplicates, a full disk, restart.

The listener runs as its own process; after every refusal it must keep serving, and nothing
half-received may reach the store.
"""

from __future__ import annotations

import hashlib
import struct
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from service.dicom.spool import dataset_bytes
from service.store.blobs import blob_store
from service.store.db import session_scope
from service.store.tables import AuditEvent, Instance
from tests.conftest import CT_3SLICE, require_path
from tests.integration.pacs.listener import (
    ScpProcess,
    association,
    node,
    sop_class,
    store_counts,
    wait_for,
)

pytestmark = pytest.mark.integration

NODES = {"scanner": node("STORESCU")}
# a sequence of undefined length whose first item is no item: pydicom cannot parse it
BAD_SEQUENCE = (
    struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    + struct.pack("<HHI", 0x1234, 0x5678, 8)
    + b"\0" * 300
)
RULE = {"name": "ct", "modality": "CT", "pipeline": "zeroshot-denoise"}


def ct3() -> list[Path]:
    return sorted(require_path(CT_3SLICE).iterdir())


def with_meta(meta_source: Path, body: bytes, out: Path) -> Path:
    """A Part 10 file: the file meta of ``meta_source`` followed by ``body`` as data set."""
    meta = pydicom.dcmread(meta_source, stop_before_pixels=True).file_meta
    buffer = BytesIO()
    write_file_meta_info(buffer, meta)
    out.write_bytes(b"\0" * 128 + b"DICM" + buffer.getvalue() + body)
    return out


def changed_copy(source: Path, out: Path, **changes: object) -> Path:
    ds = pydicom.dcmread(source)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    dcmwrite(out, ds, enforce_file_format=True)
    return out


def receive_events(settings) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with session_scope(settings.resolved_database_url) as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == "receive")))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_malformed_instances_refused_and_listener_keeps_serving(  # type: ignore[no-untyped-def]
    scp_factory, sqlite_settings, tmp_path: Path
) -> None:
    good = ct3()[0]
    body = dataset_bytes(good.read_bytes())
    other = changed_copy(good, tmp_path / "o", SOPInstanceUID="1.2.826.0.1.3680043.9.7433.1.1")
    cases = {
        "garbage": (with_meta(good, BAD_SEQUENCE, tmp_path / "g"), 0xC100),
        "truncated pixel data": (with_meta(good, body[:-5000], tmp_path / "t"), 0xC102),
        # the request announces the UID of the file meta, the data set holds another one
        "other SOP Instance UID": (
            with_meta(good, dataset_bytes(other.read_bytes()), tmp_path / "u"),
            0xC101,
        ),
    }
    scp = scp_factory(sqlite_settings, nodes=NODES, stable_age_s=0.5)
    with association(scp.port, [sop_class(good), Verification]) as assoc:
        for name, (path, status) in cases.items():
            answer = assoc.send_c_store(path)
            assert answer.Status == status, name
            assert answer.ErrorComment, name
            assert len(answer.ErrorComment) <= 64
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(good).Status == 0x0000  # the same association goes on
    wait_for(lambda: store_counts(sqlite_settings)[0] == 1, 30, "the good instance stored")
    assert scp.alive()
    assert "Traceback" not in scp.log()


def test_interrupted_study_stored_not_routed_then_completed(scp_factory, sqlite_settings) -> None:  # type: ignore[no-untyped-def]
    files = ct3()
    scp = scp_factory(sqlite_settings, nodes=NODES, rules=[RULE], stable_age_s=1.0)
    with association(scp.port, [sop_class(files[0])]) as assoc:
        for path in files[:2]:
            assert assoc.send_c_store(path).Status == 0x0000
        assoc.abort()
    with association(scp.port, [Verification]) as other:  # the listener still serves
        assert other.send_c_echo().Status == 0x0000
    (event,) = wait_for(lambda: receive_events(sqlite_settings), 30, "the receive audit event")
    assert event.detail["interrupted"] is True
    assert event.detail["instances"] == 2
    assert store_counts(sqlite_settings) == (2, 0)  # stored whole, not routed
    # the sender tries again, completely, and releases: the new instance is routed
    with association(scp.port, [sop_class(files[0])]) as assoc:
        assert [assoc.send_c_store(p).Status for p in files] == [0, 0, 0]
    wait_for(lambda: store_counts(sqlite_settings) == (3, 1), 30, "3 instances and a job")


def test_duplicates_same_ok_different_refused(  # type: ignore[no-untyped-def]
    scp_factory, sqlite_settings, tmp_path: Path
) -> None:
    original = ct3()[0]
    different = changed_copy(original, tmp_path / "different.dcm", WindowCenter=1234)
    scp = scp_factory(sqlite_settings, nodes=NODES, stable_age_s=1.0)
    with association(scp.port, [sop_class(original)]) as assoc:
        assert assoc.send_c_store(original).Status == 0x0000
        assert assoc.send_c_store(original).Status == 0x0000  # identical, in the spool
        refused = assoc.send_c_store(different)
        assert refused.Status == 0x0111
        assert "duplicate" in refused.ErrorComment
    wait_for(lambda: store_counts(sqlite_settings)[0] == 1, 30, "the instance stored")
    with association(scp.port, [sop_class(original)]) as assoc:  # now in the store
        assert assoc.send_c_store(different).Status == 0x0111
        assert assoc.send_c_store(original).Status == 0x0000
    with session_scope(sqlite_settings.resolved_database_url) as s:
        (instance,) = s.scalars(select(Instance)).all()
        kept = blob_store(sqlite_settings).path_of(instance.blob_key)
    assert dataset_bytes(kept.read_bytes()) == dataset_bytes(original.read_bytes())
    assert instance.sha256 == sha(kept)
    wait_for(lambda: not list((sqlite_settings.data_dir / "spool").rglob("*.dcm")), 30, "spool")
    assert store_counts(sqlite_settings)[0] == 1


def test_disk_below_watermark_refused_with_a700(scp_factory, sqlite_settings) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(sqlite_settings, nodes=NODES, min_free_bytes=2**62)
    path = ct3()[0]
    with association(scp.port, [sop_class(path)]) as assoc:
        answer = assoc.send_c_store(path)
    assert answer.Status == 0xA700
    assert "disk" in answer.ErrorComment
    assert not list((sqlite_settings.data_dir / "spool").rglob("*.dcm"))


def test_spool_survives_a_restart(sqlite_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = ct3()
    first = ScpProcess.start(sqlite_settings, tmp_path / "a", nodes=NODES, stable_age_s=3600)
    try:
        with association(first.port, [sop_class(files[0])]) as assoc:
            assert [assoc.send_c_store(p).Status for p in files] == [0, 0, 0]
    finally:
        assert first.stop() == 0  # SIGTERM: clean exit
    assert store_counts(sqlite_settings)[0] == 0
    second = ScpProcess.start(sqlite_settings, tmp_path / "b", nodes=NODES, stable_age_s=0.5)
    try:
        wait_for(lambda: store_counts(sqlite_settings)[0] == 3, 30, "the spooled study stored")
    finally:
        second.stop()
