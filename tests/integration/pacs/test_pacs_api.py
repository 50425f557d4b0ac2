"""The /dicom routes against a real Orthanc: nodes, echo, find (C-FIND and QIDO-RS), retrieve."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from service.settings import Settings
from tests.integration.conftest import Api, make_api
from tests.integration.pacs.listener import LISTENER_AE, config_toml, node
from tests.integration.pacs.orthanc import OrthancPeer, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def pacs_api(orthanc: OrthancPeer, sqlite_settings: Settings, tmp_path: Path) -> Iterator[Api]:
    nodes = {
        "pacs": node(
            orthanc.aet,
            port=orthanc.dicom_port,
            dicomweb_url=orthanc.dicomweb_url,
            retrieve_via="get",
        ),
        "web": {
            "dicomweb_url": orthanc.dicomweb_url,
            "send_via": "dicomweb",
            "retrieve_via": "dicomweb",
        },
        "down": node("DOWN", port=free_port()),
    }
    path = tmp_path / "dicom.toml"
    path.write_text(config_toml({"ae_title": LISTENER_AE}, nodes))
    settings = sqlite_settings.model_copy(update={"dicom_config": path, "dimse_timeout_s": 10})
    yield from make_api(settings, run_reaper=False)


def _uid(path: Path, keyword: str) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword))


def test_nodes_and_echo(pacs_api: Api) -> None:
    listing = pacs_api.get("/dicom/nodes").json()
    assert [n["name"] for n in listing["nodes"]] == ["down", "pacs", "web"]
    assert listing["listener"]["ae_title"] == LISTENER_AE
    answer = pacs_api.post("/dicom/nodes/pacs/echo")
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "0x0000"
    assert pacs_api.post("/dicom/nodes/web/echo").json()["via"] == "dicomweb"
    down = pacs_api.post("/dicom/nodes/down/echo")
    assert down.status_code == 504
    assert down.json()["error"]["code"] == "peer_unreachable"
    unknown = pacs_api.post("/dicom/nodes/nowhere/echo")
    assert unknown.status_code == 422
    assert "known nodes" in unknown.json()["error"]["message"]
    assert pacs_api.post("/dicom/nodes/pacs/echo", key="vg_bad").status_code == 401


def test_find_and_retrieve(
    pacs_api: Api, orthanc: OrthancPeer, ct3_dir: Path, j2k_ct_files: list[Path]
) -> None:
    ct3 = sorted(ct3_dir.glob("*.dcm"))
    orthanc.upload(ct3)
    orthanc.upload(j2k_ct_files)
    ct3_study = _uid(ct3[0], "StudyInstanceUID")
    for name in ("pacs", "web"):
        found = pacs_api.post(
            f"/dicom/nodes/{name}/find",
            json={"modality": "CT", "study_date": "20030101-20031231", "series": True},
        )
        assert found.status_code == 200, found.text
        body = found.json()
        assert [s["study_uid"] for s in body["studies"]] == [ct3_study]
        (series,) = body["studies"][0]["series"]
        assert series["series_uid"] == _uid(ct3[0], "SeriesInstanceUID")
        assert series["n_instances"] == 3
        text = found.text
        patient_name = str(pydicom.dcmread(ct3[0], stop_before_pixels=True).PatientName)
        assert not patient_name or patient_name not in text  # no PHI in answers
    bad = pacs_api.post("/dicom/nodes/pacs/find", json={"study_date": "2003-01-01"})
    assert bad.status_code == 422

    got = pacs_api.post("/dicom/nodes/pacs/retrieve", json={"study_uid": ct3_study})
    assert got.status_code == 201, got.text
    assert got.json()["instances_stored"] == 3
    (study,) = got.json()["studies"]
    assert study["study_instance_uid"] == ct3_study
    listed = pacs_api.get("/studies").json()["studies"]
    assert [s["id"] for s in listed] == [study["id"]]

    j2k_study = _uid(j2k_ct_files[0], "StudyInstanceUID")
    web = pacs_api.post(
        "/dicom/nodes/pacs/retrieve", json={"study_uid": j2k_study, "via": "dicomweb"}
    )
    assert web.status_code == 201, web.text
    assert web.json()["instances_stored"] == 20
    missing = pacs_api.post("/dicom/nodes/pacs/retrieve", json={"study_uid": "1.2.3.4"})
    assert missing.status_code == 404
