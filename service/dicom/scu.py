"""DIMSE client (pynetdicom): C-ECHO, C-FIND (study/series), C-MOVE and C-GET of a study.

We call peers with our listener's AE title (``listener.ae_title`` of the DICOM configuration),
which is also the C-MOVE destination the PACS knows us by. Failures are translated here, once:
no connection, an aborted association or a DIMSE timeout is
:class:`~service.errors.PeerUnreachable` (transient); a rejected association or a failure status
is :class:`~service.errors.PeerFailed` with the status in the message. Logs carry node names,
UIDs, statuses and counts, never patient names or IDs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from service.dicom.config import Node, check_ae_title, load_dicom_config
from service.dicom.query import (
    SeriesMatch,
    StudyMatch,
    StudyQuery,
    check_uid,
    series_identifier,
    series_match,
    study_identifier,
    study_match,
    unique_studies,
)
from service.errors import InvalidParameters, PeerFailed, PeerUnreachable
from service.settings import Settings

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # presentation contexts in one association (PS3.8: odd ids 1..255)
# Transfer syntaxes we accept as C-GET storage SCP (the PACS sends what it stores).
UNCOMPRESSED_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still met)
]
COMPRESSED_SYNTAXES = [
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]
# C-GET contexts when the peer does not list the SOP classes of a study.
COMMON_IMAGE_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.128",  # PET Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image (presentation)
]
_PENDING = (0xFF00, 0xFF01)
_STATUS_TEXT = {
    0xA700: "out of resources",
    0xA701: "out of resources (matches)",
    0xA702: "out of resources (sub-operations)",
    0xA801: "move destination unknown",
    0xA900: "identifier does not match SOP class",
    0xC000: "unable to process",
    0xFE00: "cancelled",
}


def status_text(status: int) -> str:
    """``0xA801 (move destination unknown)``-style description of a DIMSE status."""
    known = _STATUS_TEXT.get(status) or ("unable to process" if 0xC000 <= status <= 0xCFFF else "")
    return f"0x{status:04X}" + (f" ({known})" if known else "")


@dataclass(frozen=True)
class RetrieveOutcome:
    """Result of a C-MOVE or C-GET.

    Attributes:
        status: Final DIMSE status (0x0000 success, 0xB000 some sub-operations failed).
        completed: Sub-operations (instances) completed.
        failed: Sub-operations failed.
        warning: Sub-operations completed with a warning.
        files: Files written (C-GET only).
    """

    status: int
    completed: int
    failed: int
    warning: int
    files: list[Path] = field(default_factory=list)


def _calling_ae(settings: Settings, calling_ae: str | None) -> str:
    return check_ae_title(calling_ae or load_dicom_config(settings).listener.ae_title)


def _dimse_target(node: Node) -> tuple[str, int]:
    if not node.has_dimse or node.port is None:
        raise InvalidParameters(f"DICOM node {node.name!r} has no DIMSE service (ae_title, port)")
    return node.host, node.port


def _new_ae(settings: Settings, calling_ae: str) -> AE:
    ae = AE(ae_title=calling_ae)
    timeout = settings.dimse_timeout_s
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 15.0)
    return ae


@contextmanager
def _association(
    node: Node,
    ae: AE,
    what: str,
    *,
    ext_neg: list[Any] | None = None,
    evt_handlers: list[Any] | None = None,
) -> Iterator[Association]:
    """An established association to ``node`` (released afterwards).

    Raises:
        PeerFailed: The peer rejected the association.
        PeerUnreachable: No connection, or the peer aborted.
    """
    host, port = _dimse_target(node)
    assoc = ae.associate(
        host, port, ae_title=node.ae_title, ext_neg=ext_neg, evt_handlers=evt_handlers
    )
    if assoc.is_rejected:
        raise PeerFailed(f"DICOM node {node.name!r} rejected the association for {what}")
    if not assoc.is_established:
        raise PeerUnreachable(f"DICOM node {node.name!r}: no association for {what}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _status_of(node: Node, what: str, status: Dataset) -> int:
    """The status code of a response, raising when the exchange broke (no status)."""
    if "Status" not in status:
        raise PeerUnreachable(f"DICOM node {node.name!r}: {what} timed out or was aborted")
    return int(status.Status)


def _model(assoc: Association, node: Node, what: str, study_root: UID, patient_root: UID) -> UID:
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    for model in (study_root, patient_root):
        if model in accepted:
            return model
    raise PeerFailed(f"DICOM node {node.name!r} does not offer {what} (no context accepted)")


def echo(node: Node, settings: Settings, calling_ae: str | None = None) -> int:
    """C-ECHO ``node``.

    Returns:
        The status (0x0000).

    Raises:
        PeerFailed: Rejected or a non-success status.
        PeerUnreachable: No answer.
    """
    ae = _new_ae(settings, _calling_ae(settings, calling_ae))
    ae.add_requested_context(Verification)
    with _association(node, ae, "C-ECHO") as assoc:
        status = _status_of(node, "C-ECHO", assoc.send_c_echo())
    if status != 0:
        raise PeerFailed(f"DICOM node {node.name!r}: C-ECHO status {status_text(status)}")
    return status


def _find(
    node: Node, settings: Settings, identifier: Dataset, calling_ae: str | None
) -> list[Dataset]:
    ae = _new_ae(settings, _calling_ae(settings, calling_ae))
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    answers: list[Dataset] = []
    with _association(node, ae, "C-FIND") as assoc:
        model = _model(
            assoc,
            node,
            "C-FIND",
            StudyRootQueryRetrieveInformationModelFind,
            PatientRootQueryRetrieveInformationModelFind,
        )
        for status_ds, found in assoc.send_c_find(identifier, model):
            status = _status_of(node, "C-FIND", status_ds)
            if status in _PENDING:
                if found is not None:
                    answers.append(found)
            elif status != 0:
                raise PeerFailed(f"DICOM node {node.name!r}: C-FIND status {status_text(status)}")
    return answers


def find_studies(
    node: Node, query: StudyQuery, settings: Settings, calling_ae: str | None = None
) -> list[StudyMatch]:
    """C-FIND at study level (Study Root, else Patient Root).

    Returns:
        Matching studies without patient identifiers, at most ``query.limit``.

    Raises:
        PeerFailed: Rejected, refused (e.g. our AE unknown to the peer) or a failure status.
        PeerUnreachable: No answer / timeout.
    """
    answers = _find(node, settings, study_identifier(query), calling_ae)
    matches = unique_studies((study_match(ds) for ds in answers), query.limit)
    log.info("c-find: node %s: %d studies", node.name, len(matches))
    return matches


def find_series(
    node: Node, study_uid: str, settings: Settings, calling_ae: str | None = None
) -> list[SeriesMatch]:
    """C-FIND at series level: the series of one study."""
    answers = _find(node, settings, series_identifier(study_uid), calling_ae)
    matches = [series_match(ds, study_uid) for ds in answers]
    return [m for m in matches if m is not None]


def _retrieve_identifier(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = check_uid(study_uid)
    return ds


def _counts(node: Node, what: str, responses: Iterator[tuple[Dataset, Any]]) -> RetrieveOutcome:
    """Follow C-MOVE/C-GET responses up to the final one; its counts are the outcome."""
    final: Dataset | None = None
    for status_ds, _identifier in responses:
        status = _status_of(node, what, status_ds)
        if status not in _PENDING:
            final = status_ds
    if final is None:
        raise PeerUnreachable(f"DICOM node {node.name!r}: {what} ended without a final status")
    status = int(final.Status)
    outcome = RetrieveOutcome(
        status=status,
        completed=int(final.get("NumberOfCompletedSuboperations", 0) or 0),
        failed=int(final.get("NumberOfFailedSuboperations", 0) or 0),
        warning=int(final.get("NumberOfWarningSuboperations", 0) or 0),
    )
    if status not in (0x0000, 0xB000):
        raise PeerFailed(
            f"DICOM node {node.name!r}: {what} status {status_text(status)} "
            f"({outcome.completed} completed, {outcome.failed} failed)"
        )
    return outcome


def move_study(
    node: Node,
    study_uid: str,
    dest_ae: str,
    settings: Settings,
    calling_ae: str | None = None,
) -> RetrieveOutcome:
    """C-MOVE a study from ``node`` to the AE ``dest_ae`` (usually our listener).

    The peer must know ``dest_ae`` (with host and port) as one of its modalities.

    Returns:
        Final status and sub-operation counts (0xB000: some instances failed).

    Raises:
        PeerFailed: Rejected, destination unknown (0xA801; Orthanc 1.10 answers 0xC000) or
            another failure status.
        PeerUnreachable: No answer / timeout.
    """
    ae = _new_ae(settings, _calling_ae(settings, calling_ae))
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelMove)
    with _association(node, ae, "C-MOVE") as assoc:
        model = _model(
            assoc,
            node,
            "C-MOVE",
            StudyRootQueryRetrieveInformationModelMove,
            PatientRootQueryRetrieveInformationModelMove,
        )
        outcome = _counts(
            node,
            "C-MOVE",
            assoc.send_c_move(_retrieve_identifier(study_uid), check_ae_title(dest_ae), model),
        )
    log.info(
        "c-move: node %s study %s -> %s: %d completed, %d failed",
        node.name,
        study_uid,
        dest_ae,
        outcome.completed,
        outcome.failed,
    )
    return outcome


class _GetSink:
    """C-STORE handler of a C-GET: each instance written atomically as a Part 10 file."""

    def __init__(self, dest_dir: Path) -> None:
        self.dest_dir = dest_dir
        self.files: list[Path] = []

    def __call__(self, event: evt.Event) -> int:
        target = self.dest_dir / f"{len(self.files):06d}.dcm"
        partial = target.with_suffix(".part")
        try:
            partial.write_bytes(event.encoded_dataset())
            os.replace(partial, target)
        except OSError:
            log.exception("c-get: cannot write a received instance")
            return 0xA700
        self.files.append(target)
        return 0x0000


def _get_contexts(sop_classes: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Storage contexts ``(SOP class, syntaxes)`` for the SCP role of a C-GET.

    Per SOP class one context for the uncompressed syntaxes and one per compressed syntax: an
    acceptor accepts one syntax per context, and a PACS without a transcoder can only send the
    syntax it stores.
    """
    groups = [UNCOMPRESSED_SYNTAXES, *([ts] for ts in COMPRESSED_SYNTAXES)]
    contexts = [(uid, list(syntaxes)) for uid in sop_classes for syntaxes in groups]
    return contexts[: MAX_CONTEXTS - 1]


def _study_sop_classes(
    node: Node, study_uid: str, settings: Settings, calling_ae: str | None
) -> list[str]:
    """SOP classes of a study (``SOPClassesInStudy``), else common image storage classes."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    ds.SOPClassesInStudy = ""
    try:
        answers = _find(node, settings, ds, calling_ae)
    except PeerFailed:  # peer does not support the key or the query: use the common classes
        answers = []
    classes: list[str] = []
    for answer in answers:
        value = answer.get("SOPClassesInStudy") or []
        for uid in [value] if isinstance(value, str) else list(value):
            if str(uid).strip() and str(uid) not in classes:
                classes.append(str(uid).strip())
    return classes or list(COMMON_IMAGE_CLASSES)


def get_study(
    node: Node,
    study_uid: str,
    dest_dir: Path,
    settings: Settings,
    calling_ae: str | None = None,
) -> RetrieveOutcome:
    """C-GET a study into ``dest_dir`` (we are storage SCP on the same association).

    The study's SOP classes are asked first (C-FIND ``SOPClassesInStudy``; common image classes
    when the peer does not say); for each, storage contexts with uncompressed and each common
    compressed transfer syntax are proposed with the SCP role, so that the peer can send what
    it stores without transcoding.

    Returns:
        Final status, counts and the files written (``000000.dcm``, ...).

    Raises:
        PeerFailed: Rejected or a failure status.
        PeerUnreachable: No answer / timeout.
    """
    check_uid(study_uid)
    contexts = _get_contexts(_study_sop_classes(node, study_uid, settings, calling_ae))
    ae = _new_ae(settings, _calling_ae(settings, calling_ae))
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    roles = [build_role(uid, scp_role=True) for uid in dict.fromkeys(c for c, _ in contexts)]
    dest_dir.mkdir(parents=True, exist_ok=True)
    sink = _GetSink(dest_dir)
    with _association(
        node, ae, "C-GET", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, sink)]
    ) as assoc:
        model = _model(
            assoc,
            node,
            "C-GET",
            StudyRootQueryRetrieveInformationModelGet,
            PatientRootQueryRetrieveInformationModelGet,
        )
        counted = _counts(node, "C-GET", assoc.send_c_get(_retrieve_identifier(study_uid), model))
    log.info(
        "c-get: node %s study %s: %d received, %d failed",
        node.name,
        study_uid,
        len(sink.files),
        counted.failed,
    )
    return RetrieveOutcome(
        counted.status, counted.completed, counted.failed, counted.warning, sink.files
    )
