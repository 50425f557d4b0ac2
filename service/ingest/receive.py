"""Receive an upload: stream the request body to files in a staging folder, expand zips.

Accepted bodies:

* ``multipart/form-data`` with any number of file parts (parts without a filename, i.e. plain
  form fields, are ignored; they are capped at :data:`MAX_FIELD_BYTES` each);
* a raw body with ``Content-Type`` ``application/zip`` (also ``application/x-zip-compressed``),
  ``application/dicom``, ``application/octet-stream``, ``application/gzip`` or none; its name is
  taken from ``Content-Disposition: attachment; filename=...`` or the ``filename`` query
  parameter.

The body is consumed with ``request.stream()`` and written in the chunks it arrives in (files are
opened with a 1 MiB buffer), so memory stays bounded whatever the upload size; its size is
counted while streaming and the upload refused with :class:`~service.errors.PayloadTooLarge` as
soon as it passes ``Settings.max_upload_bytes`` (or at once when ``Content-Length`` says so).

Each received file lands in ``staging/NNNN.vgupload/<name>``; a zip archive (recognised by
content, or by a ``.zip`` name / zip content type) is extracted safely by
:func:`service.ingest.archive.extract_zip` into ``staging/NNNN.vgupload/<archive name>/`` and
removed. The ``.vgupload`` folder lets :func:`service.ingest.scan.upload_label` give every file
its upload name (``study.zip/CT/IM001``) in messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from models.errors import InputRejected
from service.errors import PayloadTooLarge
from service.ingest.archive import ExpansionBudget, extract_zip, looks_like_zip
from service.ingest.scan import UPLOAD_MARKER
from service.io.dicom_files import has_dicm_preamble
from service.settings import Settings

WRITE_BUFFER_BYTES = 1024 * 1024
MAX_FIELD_BYTES = 64 * 1024
MAX_NAME_CHARS = 200
ZIP_TYPES = {"application/zip", "application/x-zip-compressed"}
RAW_TYPES = ZIP_TYPES | {
    "",
    "application/dicom",
    "application/octet-stream",
    "application/gzip",
    "application/x-gzip",
}
_DEFAULT_NAMES = {"application/dicom": "upload.dcm", "application/zip": "upload.zip"}

_Staged = tuple[Path, str, bool]  # path, upload name, declared as zip


def safe_file_name(raw: str, default: str = "upload") -> str:
    """A client-given file name reduced to a safe base name (no folders, no leading dots)."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip().lstrip(".")
    return (name or default)[:MAX_NAME_CHARS]


def _part_dir(staging: Path, index: int) -> Path:
    folder = staging / f"{index:04d}{UPLOAD_MARKER}"
    folder.mkdir(parents=True, exist_ok=False)
    return folder


async def _chunks(request: Request, settings: Settings):  # type: ignore[no-untyped-def]
    """The request body in the chunks it arrives in, counted against the upload limit."""
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"upload of {declared} bytes exceeds the limit of {limit} bytes")
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes")
            yield chunk
    except ClientDisconnect as exc:
        raise InputRejected("the client disconnected before the upload was complete") from exc


class _MultipartSink:
    """Callbacks of python-multipart's streaming parser: each file part to its own file."""

    def __init__(self, staging: Path, max_files: int) -> None:
        self.staging = staging
        self.max_files = max_files
        self.staged: list[_Staged] = []
        self.finished = False
        self._field = b""
        self._value = b""
        self._headers: dict[str, bytes] = {}
        self._out: IO[bytes] | None = None
        self._field_bytes = 0

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._field_bytes = 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        filename = options.get(b"filename")
        if filename is None:
            return  # a plain form field: ignored
        if len(self.staged) >= self.max_files:
            raise PayloadTooLarge(f"more than {self.max_files} files in one upload")
        content_type, _ = parse_options_header(self._headers.get("content-type", b""))
        name = safe_file_name(filename.decode("utf-8", "replace"))
        path = _part_dir(self.staging, len(self.staged)) / name
        declared_zip = content_type.decode("latin-1").lower() in ZIP_TYPES
        self.staged.append((path, name, declared_zip))
        self._out = path.open("xb", buffering=WRITE_BUFFER_BYTES)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None:
            self._out.write(data[start:end])
            return
        self._field_bytes += end - start
        if self._field_bytes > MAX_FIELD_BYTES:
            raise InputRejected(f"a form field exceeds {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        self.close()

    def _end(self) -> None:
        self.finished = True

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


async def _receive_multipart(
    request: Request, staging: Path, settings: Settings, boundary: bytes | None
) -> list[_Staged]:
    if not boundary:
        raise InputRejected("multipart/form-data upload without a boundary")
    sink = _MultipartSink(staging, settings.max_archive_members)
    parser = MultipartParser(boundary, sink.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in _chunks(request, settings):
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise InputRejected(f"malformed multipart body ({exc})") from exc
    finally:
        sink.close()
    if not sink.finished:
        raise InputRejected("truncated multipart body (no closing boundary)")
    return sink.staged


def _raw_name(request: Request, content_type: str) -> str:
    _, options = parse_options_header(request.headers.get("content-disposition", ""))
    raw = options.get(b"filename")
    name = raw.decode("utf-8", "replace") if raw else request.query_params.get("filename", "")
    return safe_file_name(name, _DEFAULT_NAMES.get(content_type, "upload"))


async def _receive_raw(request: Request, staging: Path, settings: Settings, ctype: str) -> _Staged:
    name = _raw_name(request, ctype)
    path = _part_dir(staging, 0) / name
    with path.open("xb", buffering=WRITE_BUFFER_BYTES) as out:
        async for chunk in _chunks(request, settings):
            out.write(chunk)
    return path, name, ctype in ZIP_TYPES


def _expand(staged: list[_Staged], settings: Settings) -> list[Path]:
    """Replace each staged zip archive by its extracted members."""
    budget = ExpansionBudget.from_settings(settings)
    files: list[Path] = []
    for path, name, declared_zip in staged:
        named_zip = declared_zip or name.lower().endswith(".zip")
        if not (looks_like_zip(path) or (named_zip and not has_dicm_preamble(path))):
            files.append(path)
            continue
        archive = path.with_name(path.name + ".archive")
        path.rename(archive)
        files.extend(extract_zip(archive, path, name, settings, budget))
        archive.unlink()
    return files


async def receive_upload(request: Request, staging: Path, settings: Settings) -> list[Path]:
    """Stream an upload into ``staging`` and return the files to ingest.

    Args:
        request: The HTTP request (multipart/form-data, or a raw zip/DICOM/NIfTI body).
        staging: Empty private folder (``BlobStore.staging_area()``); the caller removes it.
        settings: ``max_upload_bytes`` (whole body), ``max_expanded_bytes``,
            ``max_compression_ratio``, ``max_archive_members`` (zips; also the most file parts).

    Returns:
        The received files with every zip archive replaced by its members, in upload order.

    Raises:
        PayloadTooLarge: Body, archive expansion, member or part count over the limits.
        InputRejected: Unsupported content type, malformed or truncated multipart body, unsafe
            or corrupt zip, client disconnect, or no file at all.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    ctype = content_type.decode("latin-1").lower()
    if ctype == "multipart/form-data":
        staged = await _receive_multipart(request, staging, settings, options.get(b"boundary"))
    elif ctype in RAW_TYPES:
        staged = [await _receive_raw(request, staging, settings, ctype)]
    else:
        raise InputRejected(
            f"unsupported Content-Type {ctype[:60]!r}; send multipart/form-data, application/zip, "
            "application/dicom or application/octet-stream"
        )
    if not staged:
        raise InputRejected("the upload holds no file")
    return await anyio.to_thread.run_sync(_expand, staged, settings)
