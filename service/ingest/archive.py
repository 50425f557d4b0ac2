r"""Safe extraction of uploaded zip archives.

Refusals, all before anything leaves the staging area:

* **Truncated or corrupt** archives (no central directory, bad local header, CRC mismatch,
  encrypted or unsupported members): :class:`~models.errors.InputRejected`.
* **Unsafe member names**: absolute paths (``/x``, ``\\x``, ``C:x``), ``..`` components, NUL
  bytes, and **symbolic links** (Unix mode ``S_IFLNK`` in the external attributes):
  :class:`~models.errors.InputRejected`. Members are written with exclusive creation
  (``open(..., "xb")``) below the destination only, so nothing outside it is ever touched.
* **Zip bombs**: too many members (``Settings.max_archive_members``), a declared total
  uncompressed size above ``Settings.max_expanded_bytes``, or a member whose declared
  expanded/compressed ratio exceeds ``Settings.max_compression_ratio`` (checked for members above
  :data:`RATIO_CHECK_MIN_BYTES`; small files of zeros legitimately compress a lot) are refused
  from the central directory, before extraction. During extraction the *actual* bytes are counted
  in 1 MiB chunks against the same limits, and a member that expands beyond its declared size is
  refused. (:mod:`zipfile` itself stops at the declared size and then fails the CRC, so a header
  that understates the size is refused as corrupt after at most the declared bytes were written.)
  Size refusals raise :class:`~service.errors.PayloadTooLarge`.

Members named ``__MACOSX/...``, ``.DS_Store`` and ``Thumbs.db`` (archiver litter) are skipped.
"""

from __future__ import annotations

import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from models.errors import InputRejected
from service.errors import PayloadTooLarge
from service.io.dicom_files import has_dicm_preamble
from service.settings import Settings

CHUNK_BYTES = 1024 * 1024
"""Read/write unit of extraction (1 MiB): memory stays bounded whatever the member size."""

RATIO_CHECK_MIN_BYTES = 1024 * 1024
"""Members smaller than this (expanded) are exempt from the compression-ratio check."""

_LITTER_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass
class ExpansionBudget:
    """What the archives of one upload may still expand to (shared by all its archives).

    Attributes:
        bytes_left: Expanded bytes still allowed.
        members_left: Archive members still allowed.
    """

    bytes_left: int
    members_left: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ExpansionBudget:
        """The full budget of one upload."""
        return cls(settings.max_expanded_bytes, settings.max_archive_members)


def looks_like_zip(path: Path) -> bool:
    """True when the file starts with a zip signature and is not a DICOM Part 10 file.

    A DICOM file has a free 128-byte preamble that may itself start with ``PK``; the ``DICM``
    marker at byte 128 wins.
    """
    if has_dicm_preamble(path):
        return False
    with path.open("rb") as handle:
        head = handle.read(4)
    return head in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")


def safe_member_parts(name: str, label: str) -> tuple[str, ...] | None:
    """Validate a member name and return its path components (``None``: skip the member).

    Args:
        name: Member name as stored in the archive.
        label: Upload name of the archive, for messages.

    Raises:
        InputRejected: Absolute path, drive letter, ``..`` component or NUL byte.
    """
    if "\x00" in name:
        raise InputRejected(f"{label}: unsafe zip member name {name[:80]!r} (NUL byte)")
    unified = name.replace("\\", "/")
    absolute = unified.startswith("/") or (len(unified) > 1 and unified[1] == ":")
    parts = tuple(p for p in PurePosixPath(unified).parts if p not in ("", "."))
    if absolute or ".." in parts:
        raise InputRejected(
            f"{label}: unsafe zip member name {name[:80]!r} (absolute path or '..')"
        )
    if not parts or parts[0] == "__MACOSX" or parts[-1] in _LITTER_NAMES:
        return None
    return parts


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    """True when the member's Unix mode marks it as a symbolic link."""
    return stat.S_ISLNK(info.external_attr >> 16)


def _check_central_directory(
    infos: list[zipfile.ZipInfo], label: str, settings: Settings, budget: ExpansionBudget
) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """Apply every refusal that the central directory alone allows; return members to extract."""
    if len(infos) > budget.members_left:
        raise PayloadTooLarge(
            f"{label}: {len(infos)} archive members exceed the limit of "
            f"{settings.max_archive_members} per upload"
        )
    declared = 0
    members: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
    seen: set[tuple[str, ...]] = set()
    for info in infos:
        parts = safe_member_parts(info.filename, label)
        if _is_symlink(info):
            raise InputRejected(f"{label}: zip member {info.filename[:80]!r} is a symbolic link")
        if info.flag_bits & 0x1:
            raise InputRejected(f"{label}: zip member {info.filename[:80]!r} is encrypted")
        if parts is None or info.is_dir():
            continue
        if parts in seen:
            raise InputRejected(f"{label}: duplicate zip member {info.filename[:80]!r}")
        seen.add(parts)
        declared += info.file_size
        _check_ratio(info.file_size, info.compress_size, info.filename, label, settings)
        members.append((info, parts))
    if declared > budget.bytes_left:
        raise PayloadTooLarge(
            f"{label}: declared expanded size {declared} bytes exceeds the limit of "
            f"{settings.max_expanded_bytes} bytes per upload"
        )
    return members


def _check_ratio(expanded: int, compressed: int, name: str, label: str, settings: Settings) -> None:
    """Refuse a member whose expanded/compressed ratio exceeds the configured limit."""
    if expanded < RATIO_CHECK_MIN_BYTES:
        return
    ratio = expanded / max(compressed, 1)
    if ratio > settings.max_compression_ratio:
        raise PayloadTooLarge(
            f"{label}: zip member {name[:80]!r} expands {ratio:.0f}-fold (limit "
            f"{settings.max_compression_ratio:g}); refused as a possible zip bomb"
        )


def _member_path(dest: Path, parts: tuple[str, ...], label: str) -> Path:
    """Destination of a member below ``dest`` (re-checked after resolving)."""
    target = dest.joinpath(*parts)
    resolved = target.parent.resolve() / target.name
    if resolved != dest.resolve() and dest.resolve() not in resolved.parents:
        raise InputRejected(f"{label}: zip member {'/'.join(parts)[:80]!r} leaves the archive")
    return target


def _extract_member(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    target: Path,
    label: str,
    settings: Settings,
    budget: ExpansionBudget,
) -> int:
    """Stream one member to ``target`` in 1 MiB chunks, counting actual bytes; return them."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with archive.open(info) as source, target.open("xb") as out:
        while chunk := source.read(CHUNK_BYTES):
            written += len(chunk)
            if written > budget.bytes_left:
                raise PayloadTooLarge(
                    f"{label}: archive expands beyond the limit of {settings.max_expanded_bytes} "
                    "bytes per upload"
                )
            if written > info.file_size:
                raise InputRejected(
                    f"{label}: zip member {info.filename[:80]!r} expands beyond its declared "
                    f"size of {info.file_size} bytes"
                )
            out.write(chunk)
    _check_ratio(written, info.compress_size, info.filename, label, settings)
    return written


def extract_zip(
    archive_path: Path, dest: Path, label: str, settings: Settings, budget: ExpansionBudget
) -> list[Path]:
    """Extract a zip archive safely below ``dest``.

    Args:
        archive_path: The archive on disk.
        dest: Empty folder to extract into (created if missing).
        label: Upload name of the archive, used in messages.
        settings: Limits (``max_expanded_bytes``, ``max_compression_ratio``,
            ``max_archive_members``).
        budget: What the upload's archives may still expand to; decreased by this archive.

    Returns:
        The extracted files, in archive order.

    Raises:
        InputRejected: Truncated/corrupt archive, unsafe or duplicate member name, symbolic link,
            encrypted member, member larger than declared.
        PayloadTooLarge: Too many members, or too many expanded bytes (declared or actual), or
            a compression ratio above the limit.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive_path) as archive:
            members = _check_central_directory(archive.infolist(), label, settings, budget)
            files: list[Path] = []
            for info, parts in members:
                target = _member_path(dest, parts, label)
                written = _extract_member(archive, info, target, label, settings, budget)
                budget.bytes_left -= written
                files.append(target)
            budget.members_left -= len(members)
            return files
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        zlib.error,
        EOFError,
        NotImplementedError,
    ) as exc:
        raise InputRejected(f"{label}: truncated or corrupt zip archive ({exc})") from exc
    except FileExistsError as exc:
        raise InputRejected(f"{label}: zip member names collide ({exc.filename})") from exc
    except RuntimeError as exc:  # zipfile: encrypted member, bad password
        raise InputRejected(f"{label}: unreadable zip member ({exc})") from exc
