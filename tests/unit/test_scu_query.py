"""Query model and DIMSE client against an in-process pynetdicom peer on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from service.dicom.config import Node
from service.dicom.query import (
    StudyQuery,
    check_date_range,
    series_match,
    study_identifier,
    study_match,
    unique_studies,
)
from service.dicom.scu import (
    COMPRESSED_SYNTAXES,
    MAX_CONTEXTS,
    _get_contexts,
    echo,
    find_studies,
    status_text,
)
from service.errors import PeerFailed, PeerUnreachable
from service.settings import Settings


@pytest.mark.parametrize(
    "text", ["20240101", "20240101-20241231", "-20241231", "20240101-", " 20240101 "]
)
def test_date_ranges_accepted(text: str) -> None:
    assert check_date_range(text) == text.strip()


@pytest.mark.parametrize("text", ["", "-", "2024-01-01", "20241231-20240101", "yesterday"])
def test_date_ranges_refused(text: str) -> None:
    with pytest.raises(ValueError, match="study date"):
        check_date_range(text)


def test_query_validation_and_identifier() -> None:
    with pytest.raises(ValueError, match="keyword"):
        StudyQuery(keys={"NoSuchKeyword": "x"})
    with pytest.raises(ValueError, match="sequence"):
        StudyQuery(keys={"ReferencedSeriesSequence": "x"})
    with pytest.raises(ValueError, match="UID"):
        StudyQuery(study_uid="1.2.abc")
    query = StudyQuery(modality="CT", study_date="20240101-", keys={"PatientID": "12345"})
    ds = study_identifier(query)
    assert ds.QueryRetrieveLevel == "STUDY"
    assert ds.ModalitiesInStudy == "CT"
    assert ds.StudyDate == "20240101-"
    assert ds.StudyInstanceUID == ""  # a return key
    assert "PatientName" not in ds
    assert query.safe_summary()["PatientID"] == "<given>"  # never logged


def test_matches_from_dataset_and_json() -> None:
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.3"
    ds.StudyDate = "20240102"
    ds.ModalitiesInStudy = ["CT", "SR"]
    ds.NumberOfStudyRelatedInstances = "42"
    ds.PatientName = "Doe^Jane"
    match = study_match(ds)
    assert match is not None
    assert match.modalities == ("CT", "SR")
    assert match.n_instances == 42
    assert "Doe" not in str(match.to_json())
    from_json = study_match(Dataset.from_json(ds.to_json_dict()))
    assert from_json == match
    assert study_match(Dataset()) is None
    series = Dataset()
    series.SeriesInstanceUID = "1.2.3.4"
    series.Modality = "CT"
    series.SeriesNumber = "7"
    got = series_match(series, "1.2.3")
    assert got is not None
    assert (got.study_uid, got.number, got.n_instances) == ("1.2.3", 7, None)
    twice = unique_studies([match, None, match, from_json], limit=10)
    assert twice == [match]


def test_get_contexts_fit_one_association() -> None:
    contexts = _get_contexts(["1.2.840.10008.5.1.4.1.1.2"] * 20)
    assert len(contexts) == MAX_CONTEXTS - 1
    ct = _get_contexts(["1.2.840.10008.5.1.4.1.1.2"])
    assert len(ct) == 1 + len(COMPRESSED_SYNTAXES)
    assert ["1.2.840.10008.1.2.4.90"] in [syntaxes for _, syntaxes in ct]
    assert status_text(0xA801) == "0xA801 (move destination unknown)"
    assert status_text(0xC123) == "0xC123 (unable to process)"


# -- a real pynetdicom peer on loopback ------------------------------------------------------


class Peer:
    def __init__(self, handler: Any) -> None:
        self.ae = AE(ae_title="PEER")
        self.ae.add_supported_context(Verification)
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.server = self.ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, handler)]
        )
        self.port = int(self.server.server_address[1])

    def node(self) -> Node:
        return Node(name="peer", ae_title="PEER", port=self.port)

    def stop(self) -> None:
        self.server.shutdown()


def _answers(event: Any) -> Iterator[tuple[int, Dataset | None]]:
    for n in range(3):
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = f"1.2.3.{n}"
        ds.StudyDate = "20240101"
        ds.PatientName = "Doe^Jane"  # a PACS may send it; we drop it
        yield 0xFF00, ds


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, dimse_timeout_s=2)


def test_echo_and_find_against_a_pynetdicom_peer(settings: Settings) -> None:
    peer = Peer(_answers)
    try:
        assert echo(peer.node(), settings) == 0
        found = find_studies(peer.node(), StudyQuery(), settings)
        assert [s.study_uid for s in found] == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
        assert len(find_studies(peer.node(), StudyQuery(limit=2), settings)) == 2
    finally:
        peer.stop()


def test_failure_status_is_peer_failed(settings: Settings) -> None:
    def refuse(event: Any) -> Iterator[tuple[int, None]]:
        yield 0xA700, None

    peer = Peer(refuse)
    try:
        with pytest.raises(PeerFailed, match="0xA700"):
            find_studies(peer.node(), StudyQuery(), settings)
    finally:
        peer.stop()


def test_silent_peer_is_unreachable(settings: Settings) -> None:
    release = threading.Event()

    def stall(event: Any) -> Iterator[tuple[int, None]]:
        release.wait(10)
        yield 0x0000, None

    peer = Peer(stall)
    started = time.monotonic()
    try:
        with pytest.raises(PeerUnreachable):
            find_studies(peer.node(), StudyQuery(), settings)
        assert time.monotonic() - started < 8  # bounded by dimse_timeout_s
    finally:
        release.set()
        peer.stop()


def test_wrong_called_ae_is_refused(settings: Settings) -> None:
    peer = Peer(_answers)
    peer.ae.require_called_aet = True
    try:
        wrong = Node(name="peer", ae_title="SOMEONE", port=peer.port)
        with pytest.raises(PeerFailed, match="rejected"):
            echo(wrong, settings)
    finally:
        peer.stop()
