"""DICOMweb client against a real Orthanc: STOW-RS, QIDO-RS, WADO-RS, and an unreachable peer."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from service.dicom.config import Node
from service.dicom.dicomweb import qido_series, qido_studies, stow_instances, wado_study
from service.dicom.query import StudyQuery
from service.errors import InputRejected, NotFound, PeerUnreachable
from tests.integration.pacs.orthanc import OrthancPeer, free_port

pytestmark = pytest.mark.integration


def web_node(peer: OrthancPeer) -> Node:
    return Node(
        name="orthanc",
        ae_title=peer.aet,
        port=peer.dicom_port,
        dicomweb_url=peer.dicomweb_url,
        send_via="dicomweb",
        retrieve_via="dicomweb",
    )


def _uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_stow_then_qido_then_wado(orthanc: OrthancPeer, ct3_dir: Path, tmp_path: Path) -> None:
    files = sorted(ct3_dir.glob("*.dcm"))
    node = web_node(orthanc)
    outcome = stow_instances(node, files, batch_bytes=600_000)  # forces several requests
    assert outcome.ok, outcome.failed
    assert set(outcome.stored) == _uids(files) == orthanc.sop_instance_uids()

    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    ds0 = pydicom.dcmread(files[0], stop_before_pixels=True)
    studies = qido_studies(node, StudyQuery(modality="CT", study_date=f"{ds0.StudyDate}-"))
    assert [s.study_uid for s in studies] == [study_uid]
    assert studies[0].n_instances == 3
    assert "CT" in studies[0].modalities
    assert qido_studies(node, StudyQuery(modality="MR")) == []
    assert qido_studies(node, StudyQuery(study_date="19000101-19000102")) == []
    series = qido_series(node, study_uid)
    assert len(series) == 1
    assert series[0].modality == "CT"
    assert series[0].n_instances == 3

    got = wado_study(node, study_uid, tmp_path / "wado")
    assert _uids(got) == _uids(files)
    original = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in files}
    for path in got:
        ds = pydicom.dcmread(path)
        src = original[str(ds.SOPInstanceUID)]
        assert ds.PixelData == src.PixelData
        assert ds.ImagePositionPatient == src.ImagePositionPatient


def test_compressed_series_round_trip_keeps_syntax(
    orthanc: OrthancPeer, j2k_ct_files: list[Path], tmp_path: Path
) -> None:
    node = web_node(orthanc)
    outcome = stow_instances(node, j2k_ct_files)
    assert outcome.ok
    assert len(outcome.stored) == len(j2k_ct_files) == 20
    assert orthanc.sop_instance_uids() == _uids(j2k_ct_files)
    study_uid = str(pydicom.dcmread(j2k_ct_files[0], stop_before_pixels=True).StudyInstanceUID)
    got = wado_study(node, study_uid, tmp_path / "wado")
    assert len(got) == 20
    syntaxes = {
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in got
    }
    assert syntaxes == {"1.2.840.10008.1.2.4.90"}  # JPEG 2000 lossless, as stored


def test_stow_refuses_file_without_sop_uid(orthanc: OrthancPeer, example_ct_dir: Path) -> None:
    raw = sorted(p for p in example_ct_dir.iterdir() if p.is_file())[:1]
    with pytest.raises(InputRejected, match="SOPInstanceUID"):
        stow_instances(web_node(orthanc), raw)
    assert orthanc.instances() == []


def test_wado_unknown_study_is_not_found(orthanc: OrthancPeer, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"1\.2\.3\.4\.5\.6\.7"):
        wado_study(web_node(orthanc), "1.2.3.4.5.6.7", tmp_path / "none")


def test_unreachable_peer(ct3_dir: Path) -> None:
    node = Node(
        name="down",
        dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web",
        send_via="dicomweb",
        retrieve_via="dicomweb",
    )
    with pytest.raises(PeerUnreachable, match="down"):
        stow_instances(node, sorted(ct3_dir.glob("*.dcm")), timeout_s=5)
    with pytest.raises(PeerUnreachable):
        qido_studies(node, StudyQuery(), timeout_s=5)
