"""The DICOM listener (``voxelgate scp``): C-ECHO and C-STORE into the spool.

The C-STORE handler only validates cheaply, writes atomically and answers (DESIGN rule 9): it
takes the data set exactly as the peer encoded it (no decode / re-encode), parses its header
with large values deferred, checks the UIDs and that the pixel data is as long as declared,
looks up the SOP Instance UID among the tenant's stored instances when the store already holds
the study (one indexed query per association and study, one per instance only then) and links
the file into the spool (flushed to disk first with ``listener.fsync_instances``). Ingest, audit
and routing happen later, once the study is stable (:mod:`service.dicom.stable`).

Errors are translated into DICOM statuses here, once: :class:`Refused` carries a status and an
``ErrorComment`` (never a patient attribute); any other exception becomes 0xC211 and is logged
by type only. Associations are accepted only from configured nodes that ``may_send`` and only
for our called AE title (pynetdicom rejects the others with the standard reasons "calling AE
title not recognised" / "called AE title not recognised"). Presentation contexts for SOP classes
that are not storage classes are rejected by pynetdicom.

C-STORE statuses: 0x0000 stored (or an identical duplicate); 0x0111 an instance with this SOP
Instance UID is spooled or stored with other content (kept unchanged); 0xA700 free disk space
below ``listener.min_free_bytes``; 0xA900 SOP Class UID other than the request's; 0xC100 data set
cannot be parsed; 0xC101 SOP Instance UID other than the request's, or an invalid UID; 0xC102
data set or pixel data shorter than declared; 0xC211 unexpected error (logged by type).
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import threading
import traceback
import warnings
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import uid as tsuid
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from service.dicom.config import DicomConfig
from service.dicom.spool import (
    Sidecar,
    Spool,
    dataset_bytes,
    part10_head,
    spool_for,
    study_key,
)
from service.ingest.scan import derive_uid, patient_key
from service.settings import Settings
from service.store.blobs import blob_store
from service.store.db import engine_for
from service.store.tables import Instance, Series, Study

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES: tuple[str, ...] = (
    tsuid.ExplicitVRLittleEndian,
    tsuid.ImplicitVRLittleEndian,
    tsuid.DeflatedExplicitVRLittleEndian,
    tsuid.ExplicitVRBigEndian,
    tsuid.JPEGBaseline8Bit,
    tsuid.JPEGExtended12Bit,
    tsuid.JPEGLossless,
    tsuid.JPEGLosslessSV1,
    tsuid.JPEGLSLossless,
    tsuid.JPEGLSNearLossless,
    tsuid.JPEG2000Lossless,
    tsuid.JPEG2000,
    tsuid.HTJ2KLossless,
    tsuid.HTJ2KLosslessRPCL,
    tsuid.HTJ2K,
    tsuid.RLELossless,
)
"""Transfer syntaxes accepted for every storage SOP class (uncompressed first)."""

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DUPLICATE_INSTANCE = 0x0111
NOT_SOP_CLASS = 0xA900
CANNOT_PARSE = 0xC100
BAD_UIDS = 0xC101
TRUNCATED = 0xC102
HANDLER_FAILED = 0xC211
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DEFER_BYTES = 4096
_IMPLEMENTATION = (PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION)
FAST_LOOP_DELAY_S: float | None = 0.0001
"""Poll period of the DUL reactor of an association that sends instances (pynetdicom: 1 ms).

pynetdicom's DUL thread sleeps this long whenever it finds nothing to do; on a C-STORE stream
that sleep sits between the answer and the next request (about 1 ms per instance). Associations
that only echo, or idle, keep pynetdicom's default. ``None``: never change it.
"""
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # lenient: leading zeros occur in the wild


class Refused(Exception):
    """A C-STORE the handler refuses: answered with ``status`` and ``comment`` (no PHI)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]  # ErrorComment is an LO


def status_dataset(status: int, comment: str = "") -> Dataset:
    """A C-STORE response status data set, with ``ErrorComment`` when given."""
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


@dataclass(frozen=True)
class Header:
    """What the handler needs from an instance header."""

    sop_instance_uid: str
    study_uid: str


def parse_header(
    dataset: bytes,
    transfer_syntax: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    tenant_id: str,
) -> Header:
    """Parse and check the header of one received data set (large values are not read).

    Args:
        dataset: The encoded data set, as the peer sent it (no file meta).
        transfer_syntax: Its transfer syntax (the presentation context's).
        sop_class_uid: The request's Affected SOP Class UID.
        sop_instance_uid: The request's Affected SOP Instance UID.
        tenant_id: Owner (keys the derived StudyInstanceUID exactly as the ingest does).

    Returns:
        The :class:`Header`; an empty StudyInstanceUID is replaced by the UID the ingest derives.

    Raises:
        Refused: Unparseable or truncated data set; SOP Class/Instance UID other than the
            request's; a UID that is not a valid UID (at most 64 digits and dots).
    """
    syntax = tsuid.UID(transfer_syntax)
    try:
        if syntax == tsuid.DeflatedExplicitVRLittleEndian:
            dataset = zlib.decompress(dataset, -zlib.MAX_WBITS)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = read_dataset(
                BytesIO(dataset),
                syntax.is_implicit_VR,
                syntax.is_little_endian,
                defer_size=_DEFER_BYTES,
            )
            return _checked(ds, caught, len(dataset), sop_class_uid, sop_instance_uid, tenant_id)
    except Refused:
        raise
    except Exception as exc:  # pydicom raises many types on corrupt data sets
        raise Refused(CANNOT_PARSE, f"cannot parse data set ({type(exc).__name__})") from exc


def _checked(
    ds: Dataset,
    caught: list[warnings.WarningMessage],
    size: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    tenant_id: str,
) -> Header:
    if any("End of file" in str(w.message) for w in caught):
        raise Refused(TRUNCATED, "data set truncated (unexpected end of data)")
    sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
    # An empty SOP Class/Instance UID in the data set is taken from the request, as the REST
    # ingest takes it from the file meta (real archives hold such files); a different one is not.
    if sop_uid and sop_uid != sop_instance_uid:
        raise Refused(BAD_UIDS, "SOPInstanceUID differs from the one in the request")
    if sop_class and sop_class != sop_class_uid:
        raise Refused(NOT_SOP_CLASS, "SOPClassUID differs from the one in the request")
    for keyword, value in (("SOPInstanceUID", sop_instance_uid), ("StudyInstanceUID", study_uid)):
        if value and (len(value) > 64 or not _UID.match(value)):
            raise Refused(BAD_UIDS, f"{keyword} is not a valid UID")
    if not sop_instance_uid:
        raise Refused(BAD_UIDS, "no SOPInstanceUID")
    _check_pixels(ds, size)
    if not study_uid:
        study_uid = _derived_study_uid(ds, tenant_id)
    return Header(sop_instance_uid, study_uid)


def _check_pixels(ds: Dataset, size: int) -> None:
    """Refuse an image whose pixel data is missing or runs past the end of the data."""
    if "Rows" not in ds:
        return
    elements = [ds.get_item(k, keep_deferred=True) for k in _PIXEL_KEYWORDS if k in ds]
    if not elements:
        raise Refused(TRUNCATED, "image without pixel data")
    for element in elements:
        tell = getattr(element, "value_tell", None)
        length = getattr(element, "length", None)
        if tell is not None and length not in (None, 0xFFFFFFFF) and tell + length > size:
            raise Refused(TRUNCATED, "pixel data shorter than declared")


def _derived_study_uid(ds: Dataset, tenant_id: str) -> str:
    """The StudyInstanceUID the ingest derives for an instance that has none (same inputs)."""

    def text(keyword: str) -> str:
        return str(ds.get(keyword, "") or "").strip()

    pkey = patient_key(tenant_id, text("PatientID"), text("PatientName"))
    fields = ("StudyDate", "StudyTime", "AccessionNumber", "StudyID")
    return derive_uid("study", pkey, text("FrameOfReferenceUID"), *(text(k) for k in fields))


@dataclass
class _Association:
    calling_ae: str
    called_ae: str
    studies: dict[str, str] = field(default_factory=dict)  # spool key -> study UID
    stored: dict[str, bool] = field(default_factory=dict)  # study UID -> in the store
    ended: bool = False


class StoreHandler:
    """The listener's event handlers and the state of its open associations."""

    def __init__(self, settings: Settings, config: DicomConfig, tenant_id: str) -> None:
        """Create the handlers for ``tenant_id`` (the listener's tenant, by id)."""
        self.settings = settings
        self.config = config
        self.tenant_id = tenant_id
        self.spool: Spool = spool_for(settings)
        self.blobs_root = blob_store(settings).root
        self._engine = engine_for(settings.resolved_database_url)
        self._lock = threading.Lock()
        self._open: dict[int, _Association] = {}

    # -- events --------------------------------------------------------------------------------
    def handlers(self) -> list[Any]:
        """``evt_handlers`` for :meth:`pynetdicom.AE.start_server`."""
        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_ABORTED, self.handle_aborted),
            (evt.EVT_CONN_CLOSE, self.handle_closed),
        ]

    def handle_store(self, event: Any) -> Dataset:
        """Answer one C-STORE request (never raises)."""
        try:
            self._store(event)
            return status_dataset(SUCCESS)
        except Refused as refusal:
            log.warning("C-STORE refused (0x%04X): %s", refusal.status, refusal.comment)
            return status_dataset(refusal.status, refusal.comment)
        except Exception as exc:  # one bad instance must never stop the listener
            where = traceback.extract_tb(exc.__traceback__)[-1]
            log.error(
                "C-STORE handler failed: %s at %s:%s",
                type(exc).__name__,
                Path(where.filename).name,
                where.lineno,
            )
            return status_dataset(HANDLER_FAILED, f"internal error ({type(exc).__name__})")

    def handle_released(self, event: Any) -> None:
        """An association ended by release: its studies are complete as far as it knows."""
        self._end(event, interrupted=False)

    def handle_aborted(self, event: Any) -> None:
        """An association was aborted: its studies are stored but not routed."""
        self._end(event, interrupted=True)

    def handle_closed(self, event: Any) -> None:
        """The connection closed; without a release before, the transfer was interrupted."""
        self._end(event, interrupted=True)

    def busy_keys(self) -> set[str]:
        """Spool keys of studies that an open association is still sending."""
        with self._lock:
            return {key for a in self._open.values() for key in a.studies}

    # -- the work --------------------------------------------------------------------------------
    def _store(self, event: Any) -> None:
        dul: Any = getattr(event.assoc, "dul", None)
        if FAST_LOOP_DELAY_S is not None and hasattr(dul, "_run_loop_delay"):
            dul._run_loop_delay = FAST_LOOP_DELAY_S  # private pynetdicom attribute, read per loop
        free = shutil.disk_usage(self.spool.root).free
        if free < self.config.listener.min_free_bytes:
            raise Refused(OUT_OF_RESOURCES, "out of resources: free disk space below watermark")
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        sop_instance = str(request.AffectedSOPInstanceUID)
        transfer_syntax = str(event.context.transfer_syntax)
        dataset = event.encoded_dataset(include_meta=False)  # as the peer encoded it
        header = parse_header(dataset, transfer_syntax, sop_class, sop_instance, self.tenant_id)
        state = self._state(event)
        if self._study_stored(state, header.study_uid) and not self.spool.existing(
            self.tenant_id, header.study_uid, header.sop_instance_uid
        ):
            self._check_store(header.sop_instance_uid, dataset)
        self._note(state, header.study_uid)
        head = part10_head(
            sop_class, sop_instance, transfer_syntax, _IMPLEMENTATION, state.calling_ae
        )
        outcome = self.spool.write_instance(
            self.tenant_id,
            header.study_uid,
            header.sop_instance_uid,
            head,
            dataset,
            durable=self.config.listener.fsync_instances,
        )
        if outcome == "differs":
            raise Refused(DUPLICATE_INSTANCE, "duplicate SOPInstanceUID with different content")

    def _study_stored(self, state: _Association, study_uid: str) -> bool:
        """Whether the store holds the study (asked once per association and study).

        Only then can an instance of it be a duplicate of a stored one, so a new study costs one
        indexed query per association instead of one per instance.
        """
        known = state.stored.get(study_uid)
        if known is None:
            query = (
                select(Study.id)
                .where(
                    Study.tenant_id == self.tenant_id,
                    Study.study_instance_uid == study_uid,
                    Study.deleted_at.is_(None),
                )
                .limit(1)
            )
            with self._engine.connect() as conn:
                known = conn.execute(query).scalar_one_or_none() is not None
            state.stored[study_uid] = known
        return known

    def _check_store(self, sop_instance_uid: str, dataset: bytes) -> None:
        """Refuse an instance the store holds with other content (indexed lookup, no write)."""
        query = (
            select(Instance.blob_key)
            .join(Series, Instance.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
            .where(
                Instance.sop_instance_uid == sop_instance_uid,
                Study.tenant_id == self.tenant_id,
                Study.deleted_at.is_(None),
            )
            .limit(1)
        )
        with self._engine.connect() as conn:
            blob_key = conn.execute(query).scalar_one_or_none()
        if blob_key is None:
            return
        stored = (self.blobs_root / blob_key).read_bytes()
        if dataset_bytes(stored) != dataset:
            raise Refused(DUPLICATE_INSTANCE, "duplicate SOPInstanceUID with different content")
        # identical to the stored instance: spooling it again is harmless (a duplicate at ingest)

    def _state(self, event: Any) -> _Association:
        assoc = event.assoc
        with self._lock:
            state = self._open.get(id(assoc))
            if state is None:
                state = _Association(
                    str(assoc.requestor.ae_title).strip(), str(assoc.acceptor.ae_title).strip()
                )
                self._open[id(assoc)] = state
            return state

    def _note(self, state: _Association, study_uid: str) -> None:
        """Remember the study for this association; the first time, write its sidecar."""
        key = study_key(self.tenant_id, study_uid)
        with self._lock:
            first = key not in state.studies
            state.studies[key] = study_uid
        if first:
            sidecar = Sidecar(study_uid, state.calling_ae, state.called_ae, interrupted=True)
            self.spool.write_sidecar(self.tenant_id, sidecar, create=True)

    def _end(self, event: Any, *, interrupted: bool) -> None:
        with self._lock:
            state = self._open.pop(id(event.assoc), None)
        if state is None or state.ended:
            return
        state.ended = True
        for study_uid in state.studies.values():
            sidecar = Sidecar(study_uid, state.calling_ae, state.called_ae, interrupted)
            self.spool.write_sidecar(self.tenant_id, sidecar, create=False)
        if state.studies:
            log.info(
                "association from %s %s: %d studies spooled",
                state.calling_ae,
                "interrupted" if interrupted else "released",
                len(state.studies),
            )


def build_ae(settings: Settings, config: DicomConfig) -> AE:
    """The pynetdicom AE of our listener: storage SCP for every storage class, plus C-ECHO."""
    listener = config.listener
    ae = AE(ae_title=listener.ae_title)
    ae.maximum_pdu_size = listener.max_pdu
    ae.maximum_associations = listener.max_associations
    ae.network_timeout = settings.dimse_timeout_s
    ae.acse_timeout = settings.dimse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.require_called_aet = True
    if not listener.accept_unknown_calling_ae:
        senders = sorted({n.ae_title for n in config.nodes.values() if n.may_send and n.ae_title})
        # pynetdicom accepts everyone for an empty list: use a title no peer can know instead
        ae.require_calling_aet = senders or [secrets.token_hex(8)]
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax:
            ae.add_supported_context(context.abstract_syntax, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification)
    return ae


class Listener:
    """A running listener: the association server plus the stable-age flusher thread."""

    def __init__(self, settings: Settings, config: DicomConfig, tenant_id: str) -> None:
        """Prepare (not start) the listener of ``config`` for ``tenant_id``."""
        from service.dicom.stable import StableFlusher

        self.settings = settings
        self.config = config
        self.handler = StoreHandler(settings, config, tenant_id)
        self.flusher = StableFlusher(settings, config, self.handler.busy_keys)
        self.ae = build_ae(settings, config)
        self.server: Any = None

    @property
    def port(self) -> int:
        """The TCP port the server is bound to (useful with port 0)."""
        return int(self.server.server_address[1])

    def start(self) -> None:
        """Bind and serve associations in background threads; start the flusher."""
        listener = self.config.listener
        self.server = self.ae.start_server(
            (listener.host, listener.port), block=False, evt_handlers=self.handler.handlers()
        )
        self.flusher.start()
        log.info(
            "DICOM listener %s on %s:%d (stable age %.0f s)",
            listener.ae_title,
            listener.host,
            self.port,
            listener.stable_age_s,
        )

    def stop(self) -> None:
        """Stop accepting, end open associations, let the flusher finish its current study."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.flusher.stop()
