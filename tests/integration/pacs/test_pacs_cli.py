"""``voxelgate pacs`` as a subprocess against a real Orthanc: echo, find, retrieve, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from service.settings import Settings
from service.store.auth import ensure_tenant
from service.store.db import session_scope
from tests.integration.pacs.listener import LISTENER_AE, REPO, child_env, config_toml, node
from tests.integration.pacs.orthanc import OrthancPeer

pytestmark = pytest.mark.integration


def run(settings: Settings, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "pacs", "--config", str(config), *args],
        cwd=REPO,
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_echo_find_retrieve(
    orthanc: OrthancPeer, sqlite_settings: Settings, tmp_path: Path, ct3_dir: Path
) -> None:
    files = sorted(ct3_dir.glob("*.dcm"))
    orthanc.upload(files)
    config = tmp_path / "dicom.toml"
    nodes = {"pacs": node(orthanc.aet, port=orthanc.dicom_port, dicomweb_url=orthanc.dicomweb_url)}
    config.write_text(config_toml({"ae_title": LISTENER_AE}, nodes))
    with session_scope(sqlite_settings.resolved_database_url) as session:
        ensure_tenant(session, "clinic")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    echoed = run(sqlite_settings, config, "echo", "pacs")
    assert echoed.returncode == 0, echoed.stderr
    assert json.loads(echoed.stdout) == {"node": "pacs", "status": "0x0000"}

    for extra in ([], ["--dicomweb"]):
        found = run(sqlite_settings, config, "find", "pacs", "--modality", "CT", "--series", *extra)
        assert found.returncode == 0, found.stderr
        (study,) = json.loads(found.stdout)
        assert study["study_uid"] == study_uid
        assert study["series"][0]["n_instances"] == 3

    got = run(
        sqlite_settings, config, "retrieve", "pacs", study_uid, "--tenant", "clinic", "--via", "get"
    )
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["instances_stored"] == 3

    nobody = run(sqlite_settings, config, "retrieve", "pacs", study_uid, "--tenant", "nobody")
    assert nobody.returncode == 2
    assert "no tenant" in nobody.stderr
    bad = run(sqlite_settings, config, "find", "pacs", "--date", "yesterday")
    assert bad.returncode == 2
    assert "study date" in bad.stderr
