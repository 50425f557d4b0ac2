"""Our DIMSE client against a real Orthanc: C-ECHO, C-FIND (study/series), C-GET, refusals."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from service.dicom.config import Node
from service.dicom.query import StudyQuery
from service.dicom.scu import echo, find_series, find_studies, get_study, move_study
from service.errors import PeerFailed, PeerUnreachable
from service.settings import Settings
from tests.integration.pacs.conftest import OrthancFactory
from tests.integration.pacs.orthanc import OrthancPeer, free_port

pytestmark = pytest.mark.integration

CALLING = "VOXELGATE"


def dimse_node(peer: OrthancPeer, *, retrieve_via: str = "get") -> Node:
    return Node(
        name="orthanc",
        ae_title=peer.aet,
        port=peer.dicom_port,
        retrieve_via=retrieve_via,  # type: ignore[arg-type]
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "vg-data", dimse_timeout_s=20)


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def test_echo(orthanc: OrthancPeer, settings: Settings) -> None:
    assert echo(dimse_node(orthanc), settings) == 0


def test_find_studies_and_series(
    orthanc: OrthancPeer, settings: Settings, ct3_dir: Path, j2k_ct_files: list[Path]
) -> None:
    ct3 = sorted(ct3_dir.glob("*.dcm"))
    orthanc.upload(ct3)
    orthanc.upload(j2k_ct_files)
    node = dimse_node(orthanc)
    ct3_uid, j2k_uid = (
        str(_header(ct3[0]).StudyInstanceUID),
        str(_header(j2k_ct_files[0]).StudyInstanceUID),
    )
    everything = find_studies(node, StudyQuery(modality="CT"), settings)
    assert {s.study_uid for s in everything} == {ct3_uid, j2k_uid}
    by_uid = {s.study_uid: s for s in everything}
    assert by_uid[ct3_uid].n_instances == 3
    assert by_uid[j2k_uid].n_instances == 20
    assert by_uid[ct3_uid].study_date == str(_header(ct3[0]).StudyDate)

    date = str(_header(ct3[0]).StudyDate)
    on_day = find_studies(node, StudyQuery(modality="CT", study_date=f"{date}-{date}"), settings)
    assert ct3_uid in {s.study_uid for s in on_day}
    assert find_studies(node, StudyQuery(study_date="19000101-19000101"), settings) == []
    assert find_studies(node, StudyQuery(modality="MR"), settings) == []
    limited = find_studies(node, StudyQuery(limit=1), settings)
    assert len(limited) == 1

    series = find_series(node, ct3_uid, settings)
    assert [s.series_uid for s in series] == [str(_header(ct3[0]).SeriesInstanceUID)]
    assert series[0].modality == "CT"
    assert series[0].n_instances == 3


def test_get_study_uncompressed_and_j2k(
    orthanc: OrthancPeer,
    settings: Settings,
    ct3_dir: Path,
    j2k_ct_files: list[Path],
    tmp_path: Path,
) -> None:
    ct3 = sorted(ct3_dir.glob("*.dcm"))
    orthanc.upload(ct3)
    orthanc.upload(j2k_ct_files)
    node = dimse_node(orthanc)
    for files in (ct3, j2k_ct_files):
        study_uid = str(_header(files[0]).StudyInstanceUID)
        dest = tmp_path / study_uid
        outcome = get_study(node, study_uid, dest, settings)
        assert outcome.status == 0
        assert (outcome.completed, outcome.failed) == (len(files), 0)
        got = {str(_header(p).SOPInstanceUID): p for p in outcome.files}
        assert set(got) == {str(_header(p).SOPInstanceUID) for p in files}
        for src in files:
            original = pydicom.dcmread(src)
            received = pydicom.dcmread(got[str(original.SOPInstanceUID)])
            syntax = original.file_meta.TransferSyntaxUID
            if syntax.is_compressed:  # J2K arrives as stored, bytes unchanged
                assert received.file_meta.TransferSyntaxUID == syntax
                assert received.PixelData == original.PixelData
            else:  # the peer may pick another uncompressed syntax: same pixels
                assert not received.file_meta.TransferSyntaxUID.is_compressed
                assert (received.pixel_array == original.pixel_array).all()


def test_unknown_calling_ae_is_refused(
    orthanc_factory: OrthancFactory, settings: Settings, ct3_dir: Path, tmp_path: Path
) -> None:
    peer = orthanc_factory(modalities={"gateway": (CALLING, "127.0.0.1", free_port())})
    peer.upload(sorted(ct3_dir.glob("*.dcm")))
    node = dimse_node(peer)
    assert len(find_studies(node, StudyQuery(), settings, calling_ae=CALLING)) == 1
    with pytest.raises(PeerFailed):
        find_studies(node, StudyQuery(), settings, calling_ae="STRANGER")
    study_uid = str(_header(sorted(ct3_dir.glob("*.dcm"))[0]).StudyInstanceUID)
    with pytest.raises(PeerFailed):
        get_study(node, study_uid, tmp_path / "x", settings, calling_ae="STRANGER")


def test_move_to_unknown_destination_is_refused(
    orthanc: OrthancPeer, settings: Settings, ct3_dir: Path
) -> None:
    files = sorted(ct3_dir.glob("*.dcm"))
    orthanc.upload(files)
    # PS3.4 has 0xA801 for this; Orthanc 1.10 answers 0xC000 (unable to process)
    with pytest.raises(PeerFailed, match=r"C-MOVE status 0x(A801|C000)"):
        move_study(dimse_node(orthanc), str(_header(files[0]).StudyInstanceUID), "NOBODY", settings)


def test_wrong_called_ae_and_unreachable(orthanc: OrthancPeer, settings: Settings) -> None:
    wrong = Node(name="wrong", ae_title="NOT-ORTHANC", port=orthanc.dicom_port)
    with pytest.raises(PeerFailed) as info:
        echo(wrong, settings)
    assert not isinstance(info.value, PeerUnreachable)
    down = Node(name="down", ae_title="DOWN", port=free_port())
    with pytest.raises(PeerUnreachable, match="down"):
        echo(down, settings)
