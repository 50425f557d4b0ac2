"""A third-party STOW-RS client into our gateway: Orthanc's DICOMweb plugin pushes a study.

The gateway runs as a real HTTP server (uvicorn on a free loopback port, in a thread); Orthanc
knows it as a DICOMweb server with our API key and sends with ``/dicom-web/servers/{id}/stow``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from pydicom import dcmread
from sqlalchemy import select

from service.api.app import create_app
from service.settings import Settings
from service.store.auth import create_api_key, create_tenant
from service.store.db import session_scope, upgrade_schema
from service.store.tables import Instance, Job, Study
from tests.conftest import CT_3SLICE, require_path
from tests.integration.conftest import FAST_PARAMS, wait_until
from tests.integration.pacs.conftest import OrthancFactory
from tests.integration.pacs.listener import config_toml, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[str, str, Settings]]:
    """(base URL, API key, settings) of a running gateway with a STOW routing rule."""
    config = tmp_path / "dicom.toml"
    rule = {
        "name": "stow-ct",
        "source": ["stow"],
        "modality": "CT",
        "pipeline": "zeroshot-denoise",
        "params": FAST_PARAMS,
    }
    config.write_text(config_toml({"ae_title": "VOXELGATE"}, {}, [rule]))
    settings = Settings(data_dir=tmp_path / "vg", dicom_config=config)
    upgrade_schema(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as s:
        key = create_api_key(s, create_tenant(s, "radiology").id)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, run_reaper=False), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "the gateway to listen")
        yield f"http://127.0.0.1:{port}", key, settings
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def test_orthanc_stows_a_study_into_the_gateway(
    gateway: tuple[str, str, Settings], orthanc_factory: OrthancFactory
) -> None:
    url, key, settings = gateway
    dicomweb = {
        "Enable": True,
        "Root": "/dicom-web/",
        "Servers": {
            "voxelgate": {
                "Url": f"{url}/dicomweb/",
                "HttpHeaders": {"Authorization": f"Bearer {key}"},
            }
        },
    }
    peer = orthanc_factory(config={"DicomWeb": dicomweb})
    files = sorted(require_path(CT_3SLICE).glob("*.dcm"))
    peer.upload(files)
    (study,) = peer.studies()
    answer: Any = peer.rest(
        "POST",
        "/dicom-web/servers/voxelgate/stow",
        {"Resources": [study], "Synchronous": True},
        timeout_s=60,
    )
    assert answer["InstancesCount"] == "3"
    expected = {dcmread(p).SOPInstanceUID for p in files}
    with session_scope(settings.resolved_database_url) as s:
        stored = set(s.scalars(select(Instance.sop_instance_uid)).all())
        sources = s.scalars(select(Study.source)).all()
        jobs = s.scalars(select(Job)).all()
        assert stored == expected
        assert sources == ["stow"]
        assert [j.pipeline for j in jobs] == ["zeroshot-denoise"]  # routed by the stow rule
