"""DICOMweb client (dicomweb-client): QIDO-RS queries, WADO-RS retrieval, STOW-RS sending.

Every call goes to a configured :class:`~service.dicom.config.Node` with a ``dicomweb_url``.
Transport failures are translated here, once: no answer (refused, timeout, 502/503/504) is
:class:`~service.errors.PeerUnreachable` (transient), any other refusal
:class:`~service.errors.PeerFailed`. Log lines carry node names, UIDs and counts only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from service.dicom.config import Node
from service.dicom.query import (
    SERIES_RETURN_KEYS,
    STUDY_RETURN_KEYS,
    SeriesMatch,
    StudyMatch,
    StudyQuery,
    check_uid,
    series_match,
    study_match,
    unique_studies,
)
from service.errors import (
    InputRejected,
    InvalidParameters,
    NotFound,
    PeerFailed,
    PeerUnreachable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
STOW_BATCH_BYTES = 32 * 1024**2  # one STOW-RS request carries at most about this much
_TRANSIENT_HTTP = frozenset({408, 429, 502, 503, 504})
_ANY_SYNTAX = (("application/dicom", "*"),)  # keep the stored transfer syntax (no transcoding)


def client_for(node: Node, timeout_s: float = 60.0) -> DICOMwebClient:
    """A DICOMweb client for ``node`` (no retries inside: callers decide).

    Raises:
        InvalidParameters: The node has no ``dicomweb_url``.
    """
    if not node.dicomweb_url:
        raise InvalidParameters(f"DICOM node {node.name!r} has no dicomweb_url")
    client = DICOMwebClient(url=node.dicomweb_url.rstrip("/"), timeout=timeout_s)
    client.set_http_retry_params(retry=False)
    return client


def _http_status(exc: requests.HTTPError) -> int:
    return exc.response.status_code if exc.response is not None else 0


def _call(node: Node, what: str, fn: Callable[[], T], *, missing: str = "") -> T:
    """Run one client call, translating transport errors to typed errors.

    With ``missing``, an HTTP 404 is :class:`NotFound` with that message.
    """
    try:
        return fn()
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise PeerUnreachable(
            f"DICOM node {node.name!r}: no answer to {what} ({type(exc).__name__})"
        ) from exc
    except requests.HTTPError as exc:
        status = _http_status(exc)
        if status == 404 and missing:
            raise NotFound(missing) from exc
        kind = PeerUnreachable if status in _TRANSIENT_HTTP else PeerFailed
        raise kind(f"DICOM node {node.name!r}: {what} answered HTTP {status}") from exc


def qido_studies(node: Node, query: StudyQuery, timeout_s: float = 60.0) -> list[StudyMatch]:
    """QIDO-RS ``/studies`` search.

    Returns:
        Matching studies (no patient identifiers), at most ``query.limit``.

    Raises:
        PeerUnreachable: No answer.
        PeerFailed: The server refused the query.
    """
    client = client_for(node, timeout_s)
    found = _call(
        node,
        "QIDO-RS studies",
        lambda: client.search_for_studies(
            search_filters=query.filters(), fields=list(STUDY_RETURN_KEYS), limit=query.limit
        ),
    )
    matches = unique_studies((study_match(Dataset.from_json(r)) for r in found), query.limit)
    log.info("qido: node %s: %d studies", node.name, len(matches))
    return matches


def qido_series(node: Node, study_uid: str, timeout_s: float = 60.0) -> list[SeriesMatch]:
    """QIDO-RS ``/studies/{uid}/series``: the series of one study."""
    check_uid(study_uid)
    client = client_for(node, timeout_s)
    found = _call(
        node,
        "QIDO-RS series",
        lambda: client.search_for_series(
            study_instance_uid=study_uid, fields=list(SERIES_RETURN_KEYS)
        ),
    )
    matches = [series_match(Dataset.from_json(r), study_uid) for r in found]
    return [m for m in matches if m is not None]


def wado_study(node: Node, study_uid: str, dest_dir: Path, timeout_s: float = 60.0) -> list[Path]:
    """WADO-RS: download every instance of a study into ``dest_dir`` (stored syntax kept).

    Returns:
        The files written (``000000.dcm``, ``000001.dcm``, ...).

    Raises:
        PeerUnreachable: No answer, or the transfer broke off.
        NotFound: The server does not know the study (HTTP 404).
        PeerFailed: The server refused.
    """
    check_uid(study_uid)
    client = client_for(node, timeout_s)
    dest_dir.mkdir(parents=True, exist_ok=True)

    def fetch() -> list[Path]:
        written: list[Path] = []
        instances: Iterator[Dataset] = client.iter_study(study_uid, media_types=_ANY_SYNTAX)
        for ds in instances:
            path = dest_dir / f"{len(written):06d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
        return written

    try:
        files = _call(
            node,
            "WADO-RS study",
            fetch,
            missing=f"DICOM node {node.name!r} has no study {study_uid}",
        )
    except requests.exceptions.ChunkedEncodingError as exc:
        raise PeerUnreachable(f"DICOM node {node.name!r}: WADO-RS transfer broke off") from exc
    log.info("wado: node %s: %d instances of study %s", node.name, len(files), study_uid)
    return files


@dataclass
class StowOutcome:
    """What a STOW-RS peer answered, per instance.

    Attributes:
        stored: SOPInstanceUIDs the peer acknowledged (ReferencedSOPSequence).
        failed: SOPInstanceUID -> reason for each instance the peer refused or did not mention.
        warnings: SOPInstanceUID -> warning reason for instances stored with a warning.
        http_status: Status of the last request.
    """

    stored: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, str] = field(default_factory=dict)
    http_status: int = 0

    @property
    def ok(self) -> bool:
        """Whether every instance was stored."""
        return not self.failed


def _read(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InputRejected(f"{path.name}: not a readable DICOM file ({exc})") from exc
    if not str(ds.get("SOPInstanceUID", "")).strip():
        raise InputRejected(f"{path.name}: no SOPInstanceUID")
    return ds


def _batches(paths: Sequence[Path], limit: int) -> Iterator[list[Path]]:
    batch: list[Path] = []
    size = 0
    for path in paths:
        n = path.stat().st_size
        if batch and size + n > limit:
            yield batch
            batch, size = [], 0
        batch.append(path)
        size += n
    if batch:
        yield batch


def _reason(item: Dataset, keyword: str) -> str:
    value = item.get(keyword)
    return f"0x{int(value):04X}" if isinstance(value, int) else str(value or "unspecified")


def _account(outcome: StowOutcome, answer: Dataset, sent: list[str]) -> None:
    """Record one STOW-RS answer; instances it does not mention count as failed."""
    mentioned: set[str] = set()
    for item in answer.get("ReferencedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        mentioned.add(uid)
        outcome.stored.append(uid)
        if "WarningReason" in item:
            outcome.warnings[uid] = _reason(item, "WarningReason")
    for item in answer.get("FailedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        mentioned.add(uid)
        outcome.failed[uid] = f"failure reason {_reason(item, 'FailureReason')}"
    for uid in sent:
        if uid not in mentioned:
            outcome.failed[uid] = "not acknowledged by the peer"


def _answer_of(exc: requests.HTTPError) -> Dataset | None:
    """The STOW-RS answer body of an error status (409/400 carry FailedSOPSequence)."""
    response = exc.response
    if response is None or "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def _stow_batch(
    client: DICOMwebClient, node: Node, paths: list[Path], outcome: StowOutcome
) -> None:
    datasets = [_read(p) for p in paths]
    sent = [str(ds.SOPInstanceUID) for ds in datasets]
    try:
        answer = _call(node, "STOW-RS", lambda: client.store_instances(datasets))
        outcome.http_status = 200
    except PeerFailed as exc:
        cause = exc.__cause__
        parsed = _answer_of(cause) if isinstance(cause, requests.HTTPError) else None
        if (
            parsed is None
            or isinstance(exc, PeerUnreachable)
            or not ("FailedSOPSequence" in parsed or "ReferencedSOPSequence" in parsed)
        ):
            raise  # no per-instance answer: the request as a whole was refused
        outcome.http_status = _http_status(cause) if isinstance(cause, requests.HTTPError) else 0
        answer = parsed
    _account(outcome, answer, sent)


def stow_instances(
    node: Node,
    paths: Sequence[Path],
    timeout_s: float = 60.0,
    batch_bytes: int = STOW_BATCH_BYTES,
) -> StowOutcome:
    """STOW-RS ``POST /studies``: send DICOM files, in requests of about ``batch_bytes``.

    Args:
        node: A node with ``dicomweb_url``.
        paths: DICOM Part 10 files.
        timeout_s: Connect/read timeout of each request.
        batch_bytes: Approximate size bound of one request.

    Returns:
        Per-instance outcome: acknowledged, refused (with the peer's failure reason), or not
        mentioned in the answer (counted as failed).

    Raises:
        PeerUnreachable: No answer (connection refused, timeout, 502/503/504) — retry later;
            instances of earlier batches may have been stored.
        PeerFailed: The peer refused a request without a per-instance answer.
        InputRejected: A file is not readable DICOM.
    """
    client = client_for(node, timeout_s)
    outcome = StowOutcome()
    for batch in _batches(list(paths), batch_bytes):
        _stow_batch(client, node, batch, outcome)
    log.info(
        "stow: node %s: %d stored, %d failed", node.name, len(outcome.stored), len(outcome.failed)
    )
    return outcome


def describe(outcome: StowOutcome) -> dict[str, Any]:
    """A JSON-ready summary of a :class:`StowOutcome` (counts and the first reasons)."""
    return {
        "stored": len(outcome.stored),
        "failed": len(outcome.failed),
        "warnings": len(outcome.warnings),
        "reasons": sorted(set(outcome.failed.values()))[:5],
    }
