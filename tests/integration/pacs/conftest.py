"""Fixtures for the PACS tests: a real Orthanc on loopback only (see ``orthanc.py``).

* ``orthanc`` — one Orthanc per test module that registers no extra modalities and lets any AE
  query/retrieve (``always_allow_query``); emptied before each test.
* ``orthanc_factory`` — ``orthanc_factory(modalities={...}, **kwargs)`` starts a private Orthanc
  that knows the given modalities (e.g. our listener, as C-MOVE destination or push target);
  all are stopped at the end of the test.
* ``scp_factory`` — helper A's real ``voxelgate scp`` listener (``listener.py``), re-exported.
* ``j2k_ct_files`` — the real J2K CT with its empty UIDs filled in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import EXAMPLE_CT_DICOM, require_path
from tests.integration.pacs.listener import scp_factory  # noqa: F401  (fixture for all PACS tests)
from tests.integration.pacs.orthanc import Modality, OrthancPeer, orthanc_available

OrthancFactory = Callable[..., OrthancPeer]


def _require_orthanc() -> None:
    if not orthanc_available():
        pytest.skip("Debian Orthanc (/usr/sbin/Orthanc) or gcc is not installed")


@pytest.fixture(scope="module")
def _orthanc_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    _require_orthanc()
    peer = OrthancPeer.start(tmp_path_factory.mktemp("orthanc"), always_allow_query=True)
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def orthanc(_orthanc_shared: OrthancPeer) -> OrthancPeer:
    """A running Orthanc (shared by the module), emptied before the test."""
    _orthanc_shared.clear()
    return _orthanc_shared


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[OrthancFactory]:
    """Factory of private Orthancs: ``orthanc_factory(modalities={name: (aet, host, port)})``."""
    _require_orthanc()
    started: list[OrthancPeer] = []

    def start(modalities: dict[str, Modality] | None = None, **kwargs: Any) -> OrthancPeer:
        peer = OrthancPeer.start(
            tmp_path / f"orthanc-{len(started)}", modalities=modalities, **kwargs
        )
        started.append(peer)
        return peer

    try:
        yield start
    finally:
        for peer in started:
            peer.stop()


def with_real_uids(source_dir: Path, dest_dir: Path, seed: str) -> list[Path]:
    """Copies of a series whose empty UIDs are filled in.

    The totalsegmentator example CT has empty Study/Series/SOP Instance UIDs and SOP Class UID in
    its data set (the file meta keeps the SOP class and instance UIDs): SOP UIDs are taken from
    the file meta, study and series UIDs derived from ``seed`` (same seed, same UIDs). Pixel data
    and transfer syntax are untouched.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid(entropy_srcs=[seed, "study"])
    series_uid = generate_uid(entropy_srcs=[seed, "series"])
    out = []
    for n, path in enumerate(sorted(p for p in source_dir.iterdir() if p.is_file())):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = ds.StudyInstanceUID or study_uid
        ds.SeriesInstanceUID = ds.SeriesInstanceUID or series_uid
        meta = ds.file_meta
        if not str(ds.get("SOPClassUID", "")):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not str(ds.get("SOPInstanceUID", "")):
            ds.SOPInstanceUID = str(meta.get("MediaStorageSOPInstanceUID", "")) or generate_uid(
                entropy_srcs=[seed, "sop", str(n)]
            )
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = dest_dir / f"{n:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


@pytest.fixture(scope="session")
def j2k_ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The real 20-slice JPEG 2000 lossless CT (totalsegmentator) with UIDs filled in."""
    source = require_path(EXAMPLE_CT_DICOM)
    return with_real_uids(source, tmp_path_factory.mktemp("j2k-ct"), "voxelgate-j2k-ct")
