"""DICOM sources: a folder, a single DICOM file or a ``.zip`` archive, and the images in them.

A folder is searched recursively (non-DICOM files are skipped); a ``.zip`` archive is read in
memory after a safety check (member names, member count, total declared uncompressed size).
Headers are read without pixel data to keep the image instances (DICOMDIR, SR, RTSTRUCT... are
skipped). Used by :mod:`service.io.dicom_series`.

Every unusable input raises :class:`~models.errors.InputRejected` with a message that names the
file and the problem, never a patient identifier.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from models.errors import InputRejected

MAX_ZIP_UNCOMPRESSED_BYTES = 4 * 1024**3
"""Cap on the total declared uncompressed size of a ``.zip`` source (4 GiB)."""

MAX_ZIP_MEMBERS = 200_000
"""Cap on the number of members of a ``.zip`` source."""

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


# --------------------------------------------------------------------------------------------
# Sources: folder, single file, zip archive.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One candidate file: a path on disk or a member of the open zip archive."""

    ref: Path | str
    label: str


class _Source:
    """Uniform access to the candidate files of a folder, a single file or a zip archive."""

    def __init__(self, source: Path, archive: zipfile.ZipFile | None, entries: list[_Entry]):
        self.source = source
        self.archive = archive
        self.entries = entries
        self.single_file = archive is None and source.is_file()

    def read(self, entry: _Entry, stop_before_pixels: bool) -> Dataset | None:
        """Read one entry; ``None`` if it is not a DICOM Part 10 file.

        Raises:
            InputRejected: The file looks like DICOM but its header cannot be parsed.
        """
        try:
            if self.archive is not None:
                data = _read_zip_member(self.archive, str(entry.ref), entry.label)
                fileobj: Any = io.BytesIO(data)
            else:
                fileobj = entry.ref
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = pydicom.dcmread(fileobj, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            return None
        except InputRejected:
            raise
        except Exception as exc:  # pydicom raises many types on corrupt headers
            raise InputRejected(
                f"{entry.label}: corrupt or truncated DICOM file ({type(exc).__name__}: {exc})"
            ) from exc
        for warning in caught:
            if "End of file reached" in str(warning.message):
                raise InputRejected(f"{entry.label}: truncated DICOM file (unexpected end of file)")
        return ds


def _read_zip_member(archive: zipfile.ZipFile, member: str, label: str) -> bytes:
    """Read a zip member (size limited by its declared size, CRC checked by :mod:`zipfile`)."""
    try:
        return archive.read(member)
    except (zipfile.BadZipFile, RuntimeError, OSError, ValueError) as exc:
        raise InputRejected(f"{label}: cannot read zip member ({exc})") from exc


def _check_zip_member_name(name: str, archive_path: Path) -> None:
    """Reject absolute member paths and members containing ``..``."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    absolute = name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":")
    if absolute or ".." in parts:
        raise InputRejected(
            f"{archive_path}: unsafe zip member name {name!r} (absolute path or '..')"
        )


def has_dicm_preamble(path: Path) -> bool:
    """True when bytes 128..131 of the file are ``DICM`` (a DICOM Part 10 file)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


@contextmanager
def _open_source(source: Path) -> Iterator[_Source]:
    """Open ``source`` (folder, file or zip) and yield its candidate entries."""
    if not source.exists():
        raise InputRejected(f"{source}: no such file or folder")
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file())
        yield _Source(source, None, [_Entry(p, str(p)) for p in files])
        return
    if not has_dicm_preamble(source) and zipfile.is_zipfile(source):
        try:
            archive = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputRejected(f"{source}: corrupt zip archive ({exc})") from exc
        with archive:
            yield _Source(source, archive, _zip_entries(archive, source))
        return
    yield _Source(source, None, [_Entry(source, str(source))])


def _zip_entries(archive: zipfile.ZipFile, archive_path: Path) -> list[_Entry]:
    """List the file members of a zip after the safety checks (names, count, total size)."""
    infos = archive.infolist()
    if len(infos) > MAX_ZIP_MEMBERS:
        raise InputRejected(f"{archive_path}: too many zip members ({len(infos)})")
    total = 0
    entries: list[_Entry] = []
    for info in infos:
        _check_zip_member_name(info.filename, archive_path)
        if info.is_dir():
            continue
        total += info.file_size
        entries.append(_Entry(info.filename, f"{archive_path}:{info.filename}"))
    if total > MAX_ZIP_UNCOMPRESSED_BYTES:
        raise InputRejected(
            f"{archive_path}: declared uncompressed size {total} bytes exceeds the limit of "
            f"{MAX_ZIP_UNCOMPRESSED_BYTES} bytes"
        )
    return sorted(entries, key=lambda e: str(e.ref))


def _is_image(ds: Dataset) -> bool:
    """True for image instances (has Rows/Columns), False for DICOMDIR, SR, RTSTRUCT..."""
    media_class = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")
    if media_class == _DICOMDIR_SOP_CLASS:
        return False
    return "Rows" in ds and "Columns" in ds


def _scan(src: _Source) -> list[tuple[_Entry, Dataset]]:
    """Read every entry header; keep DICOM image instances."""
    found: list[tuple[_Entry, Dataset]] = []
    for entry in src.entries:
        ds = src.read(entry, stop_before_pixels=True)
        if ds is None:
            if src.single_file:
                raise InputRejected(f"{entry.label}: not a DICOM file (no DICM preamble)")
            continue
        if not _is_image(ds):
            if src.single_file:
                raise InputRejected(f"{entry.label}: DICOM file without an image (no Rows/Columns)")
            continue
        found.append((entry, ds))
    if not found:
        raise InputRejected(f"{src.source}: no DICOM image files found")
    return found


def _str(ds: Dataset, keyword: str) -> str:
    """A string attribute, ``""`` when absent or empty."""
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()
