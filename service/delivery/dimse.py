"""C-STORE of a batch of DICOM files to a node: one association per batch, transcoding on need.

For every SOP class of the batch we propose one presentation context per transfer syntax (the
stored ones, then Explicit VR LE, Implicit VR LE and RLE Lossless; see
:mod:`service.delivery.transcode`), so that the accepted contexts tell exactly which syntaxes the
peer takes. Each instance then goes out in its stored syntax when accepted, else transcoded.
A batch needing more than 128 contexts is split by SOP class into several associations.

Statuses: success (0x0000) and warnings (0xB000, 0xB006, 0xB007) count as delivered; anything
else is a failure of that instance. Logs carry UIDs of classes, counts and statuses, never
patient data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE, _config, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from models.errors import InputRejected
from service.delivery import transcode
from service.delivery.errors import DeliveryFailed
from service.dicom.config import Node
from service.settings import Settings

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
Progress = Callable[[int], None]


@dataclass
class StoreReport:
    """Outcome of :func:`store_files`.

    Attributes:
        sent: Instances the peer stored (success or warning status).
        failed: ``(file index, status)`` of each instance the peer refused (status -1: no
            accepted context for it, or it could not be transcoded).
        transcoded: How many instances each conversion was applied to (``reencode``, ...).
        associations: Associations opened.
    """

    sent: int = 0
    failed: list[tuple[int, int]] = field(default_factory=list)
    transcoded: dict[str, int] = field(default_factory=dict)
    associations: int = 0


@dataclass(frozen=True)
class _Item:
    index: int
    path: Path
    sop_class: UID
    syntax: UID


def _scan(files: Sequence[Path]) -> list[_Item]:
    items = []
    for index, path in enumerate(files):
        try:
            ds = dcmread(path, stop_before_pixels=True)
            sop_class, sop_instance = str(ds.get("SOPClassUID", "")), ds.get("SOPInstanceUID")
            syntax = UID(ds.file_meta.TransferSyntaxUID)
        except (InvalidDicomError, AttributeError, OSError) as exc:
            raise DeliveryFailed(
                f"output file {index} is not a readable DICOM instance: {exc}", retry=False
            ) from exc
        if not sop_class or not sop_instance:
            raise DeliveryFailed(
                f"output file {index} has no SOPClassUID or SOPInstanceUID", retry=False
            )
        items.append(_Item(index, path, UID(sop_class), syntax))
    return items


def _batches(items: list[_Item]) -> list[tuple[list[_Item], list[PresentationContext]]]:
    """Group items by SOP class into associations of at most :data:`MAX_CONTEXTS` contexts."""
    by_class: dict[UID, list[_Item]] = {}
    for item in items:
        by_class.setdefault(item.sop_class, []).append(item)
    batches: list[tuple[list[_Item], list[PresentationContext]]] = []
    for sop_class, members in by_class.items():
        syntaxes = transcode.proposed_syntaxes(dict.fromkeys(m.syntax for m in members))
        contexts = [build_context(sop_class, ts) for ts in syntaxes]
        if batches and len(batches[-1][1]) + len(contexts) <= MAX_CONTEXTS:
            batches[-1][0].extend(members)
            batches[-1][1].extend(contexts)
        else:
            batches.append((list(members), contexts[:MAX_CONTEXTS]))
    return batches


def _associate(
    node: Node, settings: Settings, calling_ae: str, contexts: list[PresentationContext]
) -> Association:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.dimse_timeout_s
    ae.connection_timeout = settings.dimse_timeout_s
    assert node.port is not None
    assoc = ae.associate(node.host, node.port, contexts=contexts, ae_title=node.ae_title)
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise DeliveryFailed(f"node {node.name}: association rejected by {node.ae_title}")
    raise DeliveryFailed(
        f"node {node.name}: no association with {node.ae_title} at {node.host}:{node.port} "
        "(unreachable, aborted or timed out)"
    )


def _accepted(assoc: Association) -> dict[UID, list[UID]]:
    accepted: dict[UID, list[UID]] = {}
    for cx in assoc.accepted_contexts:
        accepted.setdefault(UID(cx.abstract_syntax or ""), []).append(UID(cx.transfer_syntax[0]))
    return accepted


def _payload(item: _Item, chosen: transcode.Plan) -> Path | Dataset:
    """The file itself when it goes as stored (streamed, never decoded), else the converted set."""
    if chosen.action == "none":
        return item.path
    return transcode.apply(dcmread(item.path), chosen)


def _send_one(assoc: Association, item: _Item, accepted: list[UID], report: StoreReport) -> None:
    try:
        chosen = transcode.plan(item.syntax, accepted)
        payload = _payload(item, chosen)
    except InputRejected as exc:
        log.warning("C-STORE: instance %d not sent: %s", item.index, exc)
        report.failed.append((item.index, -1))
        return
    if chosen.action != "none":
        report.transcoded[chosen.action] = report.transcoded.get(chosen.action, 0) + 1
    try:
        status = assoc.send_c_store(payload)
    except (ValueError, AttributeError) as exc:  # no context for it, or file meta incomplete
        log.warning("C-STORE: instance %d not sent: %s", item.index, exc)
        report.failed.append((item.index, -1))
        return
    code = int(getattr(status, "Status", -1)) if status is not None else -1
    if not status or code == -1:
        raise DeliveryFailed(
            f"no C-STORE response for instance {item.index} (association lost or timed out)",
            sent=report.sent,
        )
    if code == 0 or code in WARNING_STATUSES:
        report.sent += 1
    else:
        report.failed.append((item.index, code))


def store_files(
    node: Node,
    files: Sequence[Path],
    settings: Settings,
    *,
    calling_ae: str,
    progress: Progress | None = None,
) -> StoreReport:
    """C-STORE ``files`` to ``node`` (see the module docstring).

    Args:
        node: The destination (must have a DIMSE service).
        files: DICOM files with file meta information.
        settings: ``dimse_timeout_s`` (connection, ACSE, DIMSE and network timeouts).
        calling_ae: Our AE title.
        progress: Called with the number of instances handled so far, after each one.

    Returns:
        The :class:`StoreReport`; the caller decides what failures mean.

    Raises:
        DeliveryFailed: A file is not DICOM (``retry=False``), or the association was refused,
            could not be opened, or was lost mid-batch (``retry=True``).
    """
    if not node.has_dimse:
        raise DeliveryFailed(f"node {node.name} has no DIMSE service", retry=False)
    report = StoreReport()
    # A file sent as stored is streamed from disk by pynetdicom (its file meta names the SOP
    # class, instance and syntax), with no decode/encode; the flag is process-wide, so it is set
    # for this batch only (a worker process runs one task at a time).
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        _send_batches(node, files, settings, calling_ae, progress, report)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    log.info(
        "C-STORE to %s: %d sent, %d failed, transcoded %s, %d association(s)",
        node.name,
        report.sent,
        len(report.failed),
        report.transcoded or "none",
        report.associations,
    )
    return report


def _send_batches(
    node: Node,
    files: Sequence[Path],
    settings: Settings,
    calling_ae: str,
    progress: Progress | None,
    report: StoreReport,
) -> None:
    done = 0
    for items, contexts in _batches(_scan(files)):
        assoc = _associate(node, settings, calling_ae, contexts)
        report.associations += 1
        try:
            accepted = _accepted(assoc)
            for item in items:
                _send_one(assoc, item, accepted.get(item.sop_class, []), report)
                done += 1
                if progress is not None:
                    progress(done)
        finally:
            if assoc.is_established:
                assoc.release()
