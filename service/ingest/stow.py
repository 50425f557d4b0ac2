"""STOW-RS receive (DICOMweb, PS3.18 §10.5): a ``multipart/related`` body of DICOM parts.

The body is streamed part by part into a staging folder (bounded memory, the same upload size
and file-count limits as REST uploads); each part is validated on its own, so one bad part fails
alone, with a ``FailureReason`` in the answer:

* ``0xC000`` (cannot understand): a part that is not ``application/dicom``, or not a readable,
  complete DICOM Part 10 file;
* ``0xA900`` (data set does not match SOP class): no SOPClassUID or SOPInstanceUID;
* ``0x0110`` (processing failure): StudyInstanceUID other than the one in the URL, or the store
  refused the instance (e.g. a study UID already held for another patient).

:func:`answer` builds the ``application/dicom+json`` response body and its HTTP status: 200 when
every instance is stored, 202 when some failed, 409 when none was stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from models.errors import InputRejected
from service.errors import PayloadTooLarge
from service.ingest.scan import UPLOAD_MARKER, ScannedFile, scan_file
from service.io.dicom_files import has_dicm_preamble
from service.settings import Settings

CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_MISMATCH = 0xA900
PROCESSING_FAILURE = 0x0110
WRITE_BUFFER_BYTES = 1024 * 1024
DICOM_TYPE = "application/dicom"


class UnsupportedMediaType(InputRejected):
    """The request is not ``multipart/related; type="application/dicom"`` (HTTP 415)."""

    code = "unsupported_media_type"


@dataclass
class Part:
    """One part of a STOW-RS request.

    Attributes:
        index: Position in the request (0-based).
        path: The staged file.
        content_type: The part's media type.
        sop_class_uid: SOPClassUID, once read ("" if unreadable).
        sop_instance_uid: SOPInstanceUID, once read ("" if unreadable).
        scanned: The ingest scan of a valid part.
        failure: FailureReason of a refused part (0: none so far).
        reason: Why it was refused (no patient data).
    """

    index: int
    path: Path
    content_type: str
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    scanned: ScannedFile | None = None
    failure: int = 0
    reason: str = ""

    def fail(self, code: int, reason: str) -> None:
        """Refuse this part."""
        self.failure, self.reason = code, reason[:300]


class _Sink:
    """python-multipart callbacks: each part to its own staged file."""

    def __init__(self, staging: Path, max_parts: int) -> None:
        self.staging, self.max_parts = staging, max_parts
        self.parts: list[Part] = []
        self.finished = False
        self._field, self._value = b"", b""
        self._headers: dict[str, bytes] = {}
        self._out: IO[bytes] | None = None

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: setattr(self, "_field", self._field + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_value", self._value + d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self.close,
            "on_end": lambda: setattr(self, "finished", True),
        }

    def _begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        if len(self.parts) >= self.max_parts:
            raise PayloadTooLarge(f"more than {self.max_parts} parts in one STOW-RS request")
        ctype, _ = parse_options_header(self._headers.get("content-type", b""))
        index = len(self.parts)
        folder = self.staging / f"{index:05d}{UPLOAD_MARKER}"
        folder.mkdir()
        path = folder / f"part-{index:05d}.dcm"
        self.parts.append(Part(index, path, ctype.decode("latin-1").lower()))
        self._out = path.open("xb", buffering=WRITE_BUFFER_BYTES)

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None:
            self._out.write(data[start:end])

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def check_content_type(request: Request) -> bytes:
    """The multipart boundary of a STOW-RS request.

    Raises:
        UnsupportedMediaType: Not ``multipart/related`` with ``type="application/dicom"``.
        InputRejected: No boundary.
    """
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    kind = options.get(b"type", b"").decode("latin-1").lower()
    if ctype.decode("latin-1").lower() != "multipart/related" or kind != DICOM_TYPE:
        raise UnsupportedMediaType(
            'STOW-RS takes Content-Type: multipart/related; type="application/dicom"'
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise InputRejected("multipart/related request without a boundary")
    return boundary


async def receive_parts(request: Request, staging: Path, settings: Settings) -> list[Part]:
    """Stream the parts of a STOW-RS request into ``staging`` (the caller removes it).

    Raises:
        UnsupportedMediaType, InputRejected: Wrong media type, malformed or truncated body,
            client disconnect, no part at all.
        PayloadTooLarge: Body over ``max_upload_bytes`` or more than ``max_archive_members``
            parts.
    """
    boundary = check_content_type(request)
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request of {declared} bytes exceeds the limit of {limit} bytes")
    sink = _Sink(staging, settings.max_archive_members)
    parser = MultipartParser(boundary, sink.callbacks())  # type: ignore[arg-type]
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"request exceeds the limit of {limit} bytes")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise InputRejected(f"malformed multipart/related body ({exc})") from exc
    except ClientDisconnect as exc:
        raise InputRejected("the client disconnected before the request was complete") from exc
    finally:
        sink.close()
    if not sink.finished:
        raise InputRejected("truncated multipart/related body (no closing boundary)")
    if not sink.parts:
        raise InputRejected("the STOW-RS request holds no part")
    return sink.parts


def validate_part(part: Part, tenant_id: str, study_uid: str | None) -> None:
    """Read and check one part; on success ``part.scanned`` is set, else ``part.fail`` called."""
    if part.content_type != DICOM_TYPE:
        part.fail(CANNOT_UNDERSTAND, f"part type {part.content_type[:60]!r} is not {DICOM_TYPE}")
        return
    if not has_dicm_preamble(part.path):
        part.fail(CANNOT_UNDERSTAND, "not a DICOM Part 10 file (no preamble and DICM prefix)")
        return
    try:
        header = dcmread(part.path, stop_before_pixels=True)
        part.sop_class_uid = str(header.get("SOPClassUID", "") or "")
        part.sop_instance_uid = str(header.get("SOPInstanceUID", "") or "")
        part_study = str(header.get("StudyInstanceUID", "") or "")
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError) as exc:
        part.fail(CANNOT_UNDERSTAND, f"unreadable DICOM ({type(exc).__name__})")
        return
    if not part.sop_class_uid or not part.sop_instance_uid:
        part.fail(SOP_CLASS_MISMATCH, "SOPClassUID or SOPInstanceUID is missing")
        return
    if study_uid is not None and part_study != study_uid:
        part.fail(PROCESSING_FAILURE, "StudyInstanceUID differs from the study in the URL")
        return
    try:
        part.scanned = scan_file(part.path, tenant_id, f"part {part.index}")
    except InputRejected as exc:
        part.fail(CANNOT_UNDERSTAND, str(exc))
        return
    if part.scanned is None:
        part.fail(CANNOT_UNDERSTAND, "a DICOMDIR is not an instance")


@dataclass
class Answer:
    """The STOW-RS response: HTTP status and ``application/dicom+json`` body."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)


def _item(part: Part) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = part.sop_class_uid
    item.ReferencedSOPInstanceUID = part.sop_instance_uid
    return item


def answer(parts: list[Part]) -> Answer:
    """Response of a request whose parts are all decided (stored, or failed with a reason)."""
    stored = [p for p in parts if not p.failure]
    failed = [p for p in parts if p.failure]
    ds = Dataset()
    if stored:
        ds.ReferencedSOPSequence = [_item(p) for p in stored]
    if failed:
        items = []
        for part in failed:
            item = _item(part)
            item.FailureReason = part.failure
            items.append(item)
        ds.FailedSOPSequence = items
    status = 200 if not failed else (202 if stored else 409)
    return Answer(status, ds.to_json_dict())
