"""The listener's spool, header checks and flush, without a network (real CT files)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.filewriter import dcmwrite
from sqlalchemy import func, select

from service.dicom.scp import (
    BAD_UIDS,
    CANNOT_PARSE,
    NOT_SOP_CLASS,
    TRUNCATED,
    Refused,
    parse_header,
)
from service.dicom.spool import (
    CLAIMED,
    Sidecar,
    Spool,
    dataset_bytes,
    instance_key,
    spool_for,
    study_key,
)
from service.dicom.stable import StableFlusher, flush_study
from service.ingest.scan import scan_file
from service.store.db import session_scope
from service.store.tables import AuditEvent, Instance, Job, Study
from tests.conftest import CT_3SLICE, EXAMPLE_CT_DICOM, require_path

TENANT = "0123456789abcdef0123456789abcdef"


def ct_files() -> list[Path]:
    return sorted(require_path(CT_3SLICE).iterdir())


def part10(path: Path) -> bytes:
    return path.read_bytes()


def split(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + file meta, data set) of a Part 10 byte string."""
    body = dataset_bytes(data)
    return data[: len(data) - len(body)], body


def syntax(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID


def reencoded(path: Path, tmp: Path, **changes: object) -> bytes:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    out = tmp / "changed.dcm"
    dcmwrite(out, ds, enforce_file_format=True)
    return out.read_bytes()


# -- keys and byte comparison ------------------------------------------------------------------


def test_keys_are_hashes_not_uids() -> None:
    study = "1.2.392.200103.20080913.113635.0.2009.6.22.21.43.10.22941.1"
    key = study_key(TENANT, study)
    assert len(key) == 40
    assert set(key) <= set("0123456789abcdef")
    assert study not in key
    assert key != study_key("f" * 32, study)
    assert instance_key("1.2.3") != instance_key("1.2.4")


def test_dataset_bytes_ignores_file_meta() -> None:
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info

    source = ct_files()[0].read_bytes()
    body = dataset_bytes(source)
    assert 0 < len(body) < len(source) - 132
    meta = pydicom.dcmread(ct_files()[0], stop_before_pixels=True).file_meta
    meta.ImplementationVersionName = "OTHER_APP_1"
    meta.SourceApplicationEntityTitle = "ELSEWHERE"
    for with_length in (True, False):
        buffer = BytesIO()
        write_file_meta_info(buffer, meta, enforce_standard=with_length)
        if not with_length:
            del meta["FileMetaInformationGroupLength"]
            buffer = BytesIO()
            write_file_meta_info(buffer, meta, enforce_standard=False)
        other = b"\0" * 128 + b"DICM" + buffer.getvalue() + body
        assert other != source
        assert dataset_bytes(other) == body


# -- header checks -----------------------------------------------------------------------------


def test_parse_header_accepts_real_ct() -> None:
    path = ct_files()[0]
    sop_class, sop_uid, study_uid = uids(path)
    header = parse_header(dataset_bytes(part10(path)), syntax(path), sop_class, sop_uid, TENANT)
    assert (header.sop_instance_uid, header.study_uid) == (sop_uid, study_uid)


def test_parse_header_derives_study_uid_like_the_ingest() -> None:
    """The J2K example CT has empty Study/SOP UIDs in the data set (they are in the file meta)."""
    path = sorted(require_path(EXAMPLE_CT_DICOM).iterdir())[0]
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    header = parse_header(
        dataset_bytes(part10(path)),
        meta.TransferSyntaxUID,
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
        TENANT,
    )
    scanned = scan_file(path, TENANT)
    assert scanned is not None
    assert "study" in scanned.derived
    assert header.study_uid == scanned.study_uid
    assert header.sop_instance_uid == scanned.sop_instance_uid


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("truncated", TRUNCATED),
        ("garbage", CANNOT_PARSE),
        ("other_sop_uid", BAD_UIDS),
        ("bad_study_uid", BAD_UIDS),
        ("other_class", NOT_SOP_CLASS),
    ],
)
def test_parse_header_refuses_bad_instances(tmp_path: Path, case: str, status: int) -> None:
    path = ct_files()[0]
    sop_class, sop_uid, _ = uids(path)
    data = part10(path)
    if case == "truncated":
        data = data[:-1000]
    elif case == "garbage":
        # a sequence of undefined length whose first item is no item
        bad = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
        data = split(data)[0] + bad + struct.pack("<HHI", 0x1234, 0x5678, 8) + b"\0" * 72
    elif case == "other_sop_uid":
        sop_uid = sop_uid + ".9"
    elif case == "bad_study_uid":
        data = reencoded(path, tmp_path, StudyInstanceUID="1.2.abc")
    elif case == "other_class":
        sop_class = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    with pytest.raises(Refused) as caught:
        parse_header(dataset_bytes(data), syntax(path), sop_class, sop_uid, TENANT)
    assert caught.value.status == status
    assert 0 < len(caught.value.comment) <= 64


# -- writing, duplicates, claims -----------------------------------------------------------------


def test_write_instance_duplicates(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = ct_files()[0]
    _, sop_uid, study_uid = uids(path)
    data = part10(path)
    assert spool.write_instance(TENANT, study_uid, sop_uid, *split(data)) == "stored"
    assert spool.write_instance(TENANT, study_uid, sop_uid, *split(data)) == "identical"
    changed = reencoded(path, tmp_path, SeriesDescription="changed")
    assert spool.write_instance(TENANT, study_uid, sop_uid, *split(changed)) == "differs"
    stored = spool.existing(TENANT, study_uid, sop_uid)
    assert stored is not None
    assert stored.read_bytes() == data
    folder = spool.study_dir(TENANT, study_uid)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"{instance_key(sop_uid)}.dcm"]  # no temporary file left, no UID in a name


def test_claim_is_exclusive_and_later_arrivals_start_a_new_folder(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first, second = ct_files()[:2]
    _, sop1, study = uids(first)
    _, sop2, _ = uids(second)
    spool.write_instance(TENANT, study, sop1, *split(part10(first)))
    spool.write_sidecar(TENANT, Sidecar(study, "A", "B", interrupted=False), create=True)
    claimed = spool.claim_study(TENANT, study)
    assert claimed is not None
    assert spool.claim_study(TENANT, study) is None  # the second process gets nothing
    assert [p.name for p in claimed.files()] == [f"{instance_key(sop1)}.dcm"]
    assert claimed.sidecar() == Sidecar(study, "A", "B", False, claimed.sidecar().updated_at)
    assert spool.write_instance(TENANT, study, sop2, *split(part10(second))) == "stored"
    later = spool.claim_study(TENANT, study)
    assert later is not None
    assert [p.name for p in later.files()] == [f"{instance_key(sop2)}.dcm"]
    spool.unclaim(claimed)  # give the first back: merged into the live folder
    again = spool.claim_study(TENANT, study)
    assert again is not None
    assert len(again.files()) == 1


def test_orphaned_claims_of_dead_processes_are_taken_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = ct_files()[0]
    _, sop_uid, study = uids(path)
    spool.write_instance(TENANT, study, sop_uid, *split(part10(path)))
    claimed = spool.claim_study(TENANT, study)
    assert claimed is not None
    assert list(spool.orphaned_claims(TENANT)) == []  # we are alive
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    pid = int(dead.stdout)
    host_part = claimed.path.name.split(".", 1)[1].rsplit("-", 2)[0]
    orphan = claimed.path.with_name(f"{claimed.key}.{host_part}-{pid}-deadbeef")
    os.rename(claimed.path, orphan)
    (taken,) = spool.orphaned_claims(TENANT)
    assert taken.key == claimed.key
    assert len(taken.files()) == 1
    assert taken.path.parent.name == CLAIMED
    assert str(os.getpid()) in taken.path.name


# -- flush into the store ------------------------------------------------------------------------


def _config(tmp_path: Path, rules: str = "") -> Path:
    path = tmp_path / "dicom.toml"
    path.write_text(
        '[listener]\ntenant = "clinic"\nstable_age_s = 0.5\n\n'
        '[nodes.ct]\nae_title = "CTSCANNER"\nport = 104\n' + rules,
        encoding="utf-8",
    )
    return path


RULE = (
    '\n[[rules]]\nname = "ct"\ncalling_ae = "CTSCANNER"\nmodality = "CT"\n'
    'pipeline = "zeroshot-denoise"\n'
)


def _spool_ct(settings, tenant_id: str, interrupted: bool) -> str:  # type: ignore[no-untyped-def]
    spool = spool_for(settings)
    study = ""
    for path in ct_files():
        _, sop_uid, study = uids(path)
        assert spool.write_instance(tenant_id, study, sop_uid, *split(part10(path))) == "stored"
    sidecar = Sidecar(study, "CTSCANNER", "VOXELGATE", interrupted=interrupted)
    spool.write_sidecar(tenant_id, sidecar, create=True)
    return study


def _tenant(settings) -> str:  # type: ignore[no-untyped-def]
    from service.store.auth import ensure_tenant

    with session_scope(settings.resolved_database_url) as session:
        return ensure_tenant(session, "clinic").id


def test_flush_study_ingests_audits_and_routes(sqlite_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = sqlite_settings.model_copy(update={"dicom_config": _config(tmp_path, RULE)})
    tenant_id = _tenant(settings)
    study = _spool_ct(settings, tenant_id, interrupted=False)
    result = flush_study(settings, tenant_id, study, route=True)
    assert result is not None
    assert not result.interrupted
    assert result.report.instances_stored == 3
    assert len(result.routed) == 1
    assert result.routed[0].rule == "ct"
    assert flush_study(settings, tenant_id, study, route=True) is None  # nothing left
    with session_scope(settings.resolved_database_url) as s:
        assert s.scalar(select(func.count(Instance.id))) == 3
        assert s.scalar(select(Study.source)) == "dimse"
        (job,) = s.scalars(select(Job)).all()
        assert job.id == result.routed[0].job_id
        assert job.state == "queued"
        receive = s.scalars(select(AuditEvent).where(AuditEvent.action == "receive")).one()
        assert receive.detail["calling_ae"] == "CTSCANNER"
        assert receive.detail["instances"] == 3
        assert receive.detail["interrupted"] is False
    assert not any(spool_for(settings).studies(tenant_id))


def test_interrupted_study_is_stored_not_routed(sqlite_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = sqlite_settings.model_copy(update={"dicom_config": _config(tmp_path, RULE)})
    tenant_id = _tenant(settings)
    study = _spool_ct(settings, tenant_id, interrupted=True)
    result = flush_study(settings, tenant_id, study, route=True)
    assert result is not None
    assert result.interrupted
    assert result.routed == []
    assert result.report.instances_stored == 3
    with session_scope(settings.resolved_database_url) as s:
        assert s.scalar(select(func.count(Job.id))) == 0
        receive = s.scalars(select(AuditEvent).where(AuditEvent.action == "receive")).one()
        assert receive.detail["interrupted"] is True


def test_stable_flusher_waits_for_the_stable_age_and_busy_studies(
    sqlite_settings, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from service.dicom.config import load_dicom_config

    settings = sqlite_settings.model_copy(update={"dicom_config": _config(tmp_path, RULE)})
    tenant_id = _tenant(settings)
    study = _spool_ct(settings, tenant_id, interrupted=False)
    busy: set[str] = {study_key(tenant_id, study)}
    flusher = StableFlusher(settings, load_dicom_config(settings), lambda: set(busy))
    (spooled,) = flusher.spool.studies(tenant_id)
    assert flusher.run_once(spooled.last_arrival + 0.1) == 0  # too young
    assert flusher.run_once(spooled.last_arrival + 10) == 0  # an association still sends it
    busy.clear()
    assert flusher.run_once(spooled.last_arrival + 10) == 1
    with session_scope(settings.resolved_database_url) as s:
        assert s.scalar(select(func.count(Instance.id))) == 3
        assert s.scalar(select(func.count(Job.id))) == 1


def test_flusher_leaves_a_study_our_c_move_brings_and_never_routes_it(
    sqlite_settings, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from service.dicom.config import load_dicom_config

    settings = sqlite_settings.model_copy(update={"dicom_config": _config(tmp_path, RULE)})
    tenant_id = _tenant(settings)
    study = _spool_ct(settings, tenant_id, interrupted=False)
    spool = spool_for(settings)
    spool.expect(tenant_id, study, ttl_s=60)
    flusher = StableFlusher(settings, load_dicom_config(settings), set)
    (spooled,) = flusher.spool.studies(tenant_id)
    until = spool.expected_until(tenant_id, spooled.key)
    assert until is not None
    assert flusher.run_once(until - 1) == 0  # stable, but our retrieve will ingest it
    assert flusher.run_once(until + 1) == 1  # the retrieve died: stored, not routed
    assert spool.expected_until(tenant_id, spooled.key) is None
    with session_scope(settings.resolved_database_url) as s:
        assert s.scalar(select(func.count(Instance.id))) == 3
        assert s.scalar(select(func.count(Job.id))) == 0


def test_refused_study_is_quarantined(sqlite_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from models.errors import InputRejected

    settings = sqlite_settings.model_copy(update={"dicom_config": _config(tmp_path)})
    tenant_id = _tenant(settings)
    spool = spool_for(settings)
    first, second = ct_files()[:2]
    _, sop1, study = uids(first)
    spool.write_instance(tenant_id, study, sop1, *split(part10(first)))
    other_patient = reencoded(second, tmp_path, PatientID="SOMEONE-ELSE")
    _, sop2, _ = uids(second)
    spool.write_instance(tenant_id, study, sop2, *split(other_patient))
    with pytest.raises(InputRejected):
        flush_study(settings, tenant_id, study, route=True)
    failed = spool.tenant_dir(tenant_id) / ".failed"
    (kept,) = failed.iterdir()
    assert len(list(kept.glob("*.dcm"))) == 2
    with session_scope(settings.resolved_database_url) as s:
        assert s.scalar(select(func.count(Instance.id))) == 0


def test_part10_head_reads_back_with_pydicom(tmp_path: Path) -> None:
    from service.dicom.spool import part10_head

    source = ct_files()[0]
    sop_class, sop_uid, study_uid = uids(source)
    body = dataset_bytes(source.read_bytes())
    head = part10_head(
        sop_class, sop_uid, syntax(source), ("1.2.826.0.1.3680043.9.1", "VG_1"), "PEER"
    )
    out = tmp_path / "x.dcm"
    out.write_bytes(head + body)
    ds = pydicom.dcmread(out)
    assert ds.file_meta.MediaStorageSOPInstanceUID == sop_uid
    assert ds.file_meta.TransferSyntaxUID == syntax(source)
    assert ds.file_meta.SourceApplicationEntityTitle == "PEER"
    assert ds.StudyInstanceUID == study_uid
    assert ds.pixel_array.shape == (512, 512)
    assert dataset_bytes(out.read_bytes()) == body


@pytest.mark.parametrize(
    "name", ["emri_small_big_endian.dcm", "emri_small_RLE.dcm", "image_dfl.dcm", "CT_small.dcm"]
)
def test_parse_header_other_transfer_syntaxes(pydicom_file, name: str) -> None:  # type: ignore[no-untyped-def]
    path = pydicom_file(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    header = parse_header(
        dataset_bytes(path.read_bytes()), syntax(path), ds.SOPClassUID, ds.SOPInstanceUID, TENANT
    )
    assert header.study_uid == ds.StudyInstanceUID


def test_handler_turns_unexpected_errors_into_a_status(sqlite_settings, caplog) -> None:  # type: ignore[no-untyped-def]
    """A bug in the handler answers 0xC211 (type name only) instead of killing the listener."""
    import logging
    from types import SimpleNamespace

    from service.dicom.config import DicomConfig
    from service.dicom.scp import HANDLER_FAILED, StoreHandler

    handler = StoreHandler(sqlite_settings, DicomConfig(), TENANT)

    def explode(include_meta: bool = True) -> bytes:
        raise RuntimeError("secret patient detail")

    assoc = SimpleNamespace(
        requestor=SimpleNamespace(ae_title="A"), acceptor=SimpleNamespace(ae_title="B")
    )
    event = SimpleNamespace(
        assoc=assoc,
        request=SimpleNamespace(AffectedSOPClassUID="1.2", AffectedSOPInstanceUID="1.2.3"),
        context=SimpleNamespace(transfer_syntax="1.2.840.10008.1.2.1"),
        encoded_dataset=explode,
    )
    with caplog.at_level(logging.ERROR, logger="service.dicom.scp"):
        answer = handler.handle_store(event)
    assert answer.Status == HANDLER_FAILED
    assert "RuntimeError" in answer.ErrorComment
    assert "secret" not in answer.ErrorComment
    assert "RuntimeError" in caplog.text
    assert "secret" not in caplog.text


def test_failed_ingest_gives_the_study_back_to_the_spool(  # type: ignore[no-untyped-def]
    sqlite_settings, tmp_path: Path, monkeypatch
) -> None:
    import service.dicom.stable as stable

    settings = sqlite_settings.model_copy(update={"dicom_config": _config(tmp_path)})
    tenant_id = _tenant(settings)
    study = _spool_ct(settings, tenant_id, interrupted=False)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("database went away")

    monkeypatch.setattr(stable, "ingest_files", broken)
    with pytest.raises(RuntimeError):
        flush_study(settings, tenant_id, study, route=True)
    monkeypatch.undo()
    result = flush_study(settings, tenant_id, study, route=True)  # all files still there
    assert result is not None
    assert result.report.instances_stored == 3
    assert not result.interrupted  # the sidecar came back too
