"""Fixtures for the PACS tests: a real Orthanc on loopback only (see ``orthanc.py``).

* ``orthanc`` — one Orthanc per test module that registers no extra modalities and lets any AE
  query/retrieve (``always_allow_query``); emptied before each test.
* ``orthanc_factory`` — ``orthanc_factory(modalities={...}, **kwargs)`` starts a private Orthanc
  that knows the given modalities (e.g. our listener, as C-MOVE destination or push target);
  all are stopped at the end of the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

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
