"""`voxelgate scp` against real peers: dcmtk storescu/echoscu and a pynetdicom SCU.

Each test starts the real listener process on a free loopback port (``scp_factory``) with the
job store of ``sqlite_settings``; checks go to the store (rows, files) and the audit log.
"""

from __future__ import annotations

import re
import subprocess

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from service.dicom.spool import dataset_bytes
from service.store.blobs import blob_store
from service.store.db import session_scope
from service.store.tables import AuditEvent, Instance, Job, Series, Study
from tests.conftest import CT_3SLICE, EXAMPLE_CT_DICOM, require_path
from tests.integration.pacs.listener import (
    LISTENER_AE,
    SENDER_AE,
    association,
    dcmtk,
    node,
    sop_class,
    store_counts,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.integration

CT_RULE = {
    "name": "ct-denoise",
    "calling_ae": f"{SENDER_AE}|PYSCU",
    "modality": "CT",
    "pipeline": "zeroshot-denoise",
    "priority": 6,
}
NODES = {"storescu": node(SENDER_AE), "pyscu": node("PYSCU")}


def test_real_ct_series_stored_and_routed(scp_factory, sqlite_settings) -> None:  # type: ignore[no-untyped-def]
    """storescu sends the uncompressed CT, a pynetdicom SCU the JPEG 2000 one (as encoded)."""
    ct3 = sorted(require_path(CT_3SLICE).iterdir())
    j2k = sorted(require_path(EXAMPLE_CT_DICOM).iterdir())
    scp = scp_factory(sqlite_settings, nodes=NODES, rules=[CT_RULE], stable_age_s=1.0)
    done = storescu(scp.port, ct3)
    assert done.returncode == 0, done.stderr
    with association(scp.port, [sop_class(j2k[0])], [JPEG2000Lossless], calling_ae="PYSCU") as a:
        assert a.is_established
        statuses = [a.send_c_store(path).Status for path in j2k]
    assert statuses == [0x0000] * len(j2k)
    wait_for(lambda: store_counts(sqlite_settings) == (23, 2), 30, "23 instances and 2 jobs")
    blobs = blob_store(sqlite_settings)
    with session_scope(sqlite_settings.resolved_database_url) as s:
        studies = s.scalars(select(Study)).all()
        assert sorted(st.source for st in studies) == ["dimse", "dimse"]
        assert sorted(st.uid_derived for st in studies) == [False, True]  # J2K: no StudyUID
        jobs = s.scalars(select(Job)).all()
        assert {j.pipeline for j in jobs} == {"zeroshot-denoise"}
        assert {j.priority for j in jobs} == {6}
        stored = {i.sop_instance_uid: i.blob_key for i in s.scalars(select(Instance))}
        receive = s.scalars(select(AuditEvent).where(AuditEvent.action == "receive")).all()
        assert sorted(e.detail["calling_ae"] for e in receive) == ["PYSCU", SENDER_AE]
        assert {e.detail["interrupted"] for e in receive} == {False}
    for path in j2k:  # stored exactly as sent: same data set bytes, still JPEG 2000
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        kept = blobs.path_of(stored[meta.MediaStorageSOPInstanceUID])
        assert dataset_bytes(kept.read_bytes()) == dataset_bytes(path.read_bytes())
        assert pydicom.dcmread(kept, stop_before_pixels=True).file_meta.TransferSyntaxUID == (
            JPEG2000Lossless
        )
    spool = sqlite_settings.data_dir / "spool"
    assert not [p for p in spool.rglob("*.dcm")], "spool not emptied"
    patient = pydicom.dcmread(ct3[0], stop_before_pixels=True)
    log = scp.log(tail=None)
    assert str(patient.PatientName) not in log
    assert not re.search(rf"\b{re.escape(str(patient.PatientID))}\b", log)


def _echoscu(port: int, calling: str, called: str) -> subprocess.CompletedProcess[str]:
    cmd = [dcmtk("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_echo_and_association_checks(scp_factory, sqlite_settings) -> None:  # type: ignore[no-untyped-def]
    nodes = {**NODES, "viewer": node("VIEWER", may_send=False)}
    scp = scp_factory(sqlite_settings, nodes=nodes)
    ok = _echoscu(scp.port, SENDER_AE, LISTENER_AE)
    assert ok.returncode == 0, ok.stderr
    for calling, called, reason in (
        ("STRANGER", LISTENER_AE, "Calling AE Title Not Recognized"),
        ("VIEWER", LISTENER_AE, "Calling AE Title Not Recognized"),  # a node that may not send
        (SENDER_AE, "SOMEONEELSE", "Called AE Title Not Recognized"),
    ):
        refused = _echoscu(scp.port, calling, called)
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stderr + refused.stdout
        assert reason in refused.stderr + refused.stdout
    with association(scp.port, [Verification]) as assoc:  # still serving
        assert assoc.send_c_echo().Status == 0x0000


def test_unsupported_sop_class_context_is_rejected(scp_factory, sqlite_settings) -> None:  # type: ignore[no-untyped-def]
    private = "1.2.826.0.1.3680043.9.7433.99.1"  # no storage class
    worklist = "1.2.840.10008.5.1.4.31"  # Modality Worklist FIND: not ours
    scp = scp_factory(sqlite_settings, nodes=NODES)
    with association(scp.port, [Verification, private, worklist]) as assoc:
        assert assoc.is_established
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
        assert accepted == {Verification}
        assert rejected == {private, worklist}


def test_enhanced_multiframe_and_compressed_syntaxes_accepted(  # type: ignore[no-untyped-def]
    scp_factory, sqlite_settings, pydicom_file
) -> None:
    names = [
        "eCT_Supplemental.dcm",  # Enhanced CT, 2 frames
        "emri_small.dcm",  # Enhanced MR, 10 frames
        "emri_small_RLE.dcm",  # emri_small's SOP Instance UID, other encoding: 0x0111
        "JPEG-LL.dcm",  # JPEG lossless SV1
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
        "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless, empty StudyInstanceUID
    ]
    files = [pydicom_file(n) for n in names]
    scp = scp_factory(sqlite_settings, nodes=NODES, stable_age_s=0.5)
    statuses = {}
    for path in files:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        with association(scp.port, [meta.MediaStorageSOPClassUID], [meta.TransferSyntaxUID]) as a:
            assert a.is_established, path.name
            statuses[path.name] = a.send_c_store(path).Status
    # emri_small_RLE.dcm has the SOP Instance UID of emri_small.dcm but another encoding
    assert statuses.pop("emri_small_RLE.dcm") == 0x0111
    assert set(statuses.values()) == {0x0000}, statuses
    wait_for(lambda: store_counts(sqlite_settings)[0] == 5, 30, "5 stored instances")
    with session_scope(sqlite_settings.resolved_database_url) as s:
        modalities = sorted(s.scalars(select(Series.modality)))
    assert modalities.count("MR") == 1
    assert "CT" in modalities


def test_parallel_associations_sending_the_same_study(scp_factory, sqlite_settings) -> None:  # type: ignore[no-untyped-def]
    """Four storescu at once, same instances: every C-STORE succeeds, each instance stored once."""
    ct3 = sorted(require_path(CT_3SLICE).iterdir())
    scp = scp_factory(sqlite_settings, nodes=NODES, rules=[CT_RULE], stable_age_s=1.0)
    cmd = [dcmtk("storescu"), "-aet", SENDER_AE, "-aec", LISTENER_AE, "127.0.0.1", str(scp.port)]
    senders = [
        subprocess.Popen([*cmd, *map(str, ct3)], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for sender in senders:
        _, err = sender.communicate(timeout=60)
        assert sender.returncode == 0, err
        assert "Failed" not in err
    wait_for(lambda: store_counts(sqlite_settings) == (3, 1), 30, "3 instances and one job")
    assert scp.alive()


def test_storescu_proposes_jpeg2000_for_the_j2k_ct(
    scp_factory, sqlite_settings, j2k_ct_files
) -> None:  # type: ignore[no-untyped-def]
    """storescu needs the UIDs in the data set: the J2K CT with its empty UIDs filled in."""
    scp = scp_factory(sqlite_settings, nodes=NODES, stable_age_s=0.5)
    done = storescu(scp.port, j2k_ct_files, extra=["-xv"])  # propose JPEG 2000 lossless
    assert done.returncode == 0, done.stderr
    wait_for(lambda: store_counts(sqlite_settings)[0] == 20, 30, "20 stored instances")
    blobs = blob_store(sqlite_settings)
    with session_scope(sqlite_settings.resolved_database_url) as s:
        keys = list(s.scalars(select(Instance.blob_key)))
    syntaxes = {
        pydicom.dcmread(blobs.path_of(k), stop_before_pixels=True).file_meta.TransferSyntaxUID
        for k in keys
    }
    assert syntaxes == {JPEG2000Lossless}
