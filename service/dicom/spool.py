"""The listener's spool: received instances wait here, grouped by study, until the study is stable.

Layout under ``<data_dir>/spool``::

    <tenant id>/<study key>/<instance key>.dcm     one received instance (DICOM Part 10 file)
    <tenant id>/<study key>/study.json             sidecar: study UID, AEs, interrupted or not
    <tenant id>/.claimed/<study key>.<owner>        a study being ingested by one process
    <tenant id>/.failed/<study key>.<owner>         a study the store refused (kept for a human)
    <tenant id>/.expected/<study key>              a retrieve (C-MOVE) of ours is bringing it:
                                                   its expiry time; not ingested by the flusher
                                                   before then, and never routed

Keys are hashes (:func:`study_key`, :func:`instance_key`): no UID, let alone a patient
attribute, ever appears in a path. Every file appears by an atomic link from a temporary sibling
(``os.link`` never overwrites, so two associations sending the same instance cannot clobber each
other); the sidecar by ``os.replace``. A study is **claimed** by renaming its folder: exactly one
process wins the rename, so two processes never ingest the same files, and an instance arriving
after the claim starts a fresh folder that is ingested later. The spool is plain files: after a
restart the flusher simply finds the folders again, and claims of a dead process are taken back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from service.settings import Settings

SIDECAR = "study.json"
CLAIMED = ".claimed"
FAILED = ".failed"
EXPECTED = ".expected"
_HEX = frozenset("0123456789abcdef")
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN"} | {b"UR", b"UT", b"UV"}
)

WriteOutcome = Literal["stored", "identical", "differs"]


def study_key(tenant_id: str, study_uid: str) -> str:
    """Folder name of a study in the spool: a hash of tenant and StudyInstanceUID."""
    return hashlib.sha256(f"study\x00{tenant_id}\x00{study_uid}".encode()).hexdigest()[:40]


def instance_key(sop_instance_uid: str) -> str:
    """File name (without suffix) of an instance in the spool: a hash of its SOPInstanceUID."""
    return hashlib.sha256(f"instance\x00{sop_instance_uid}".encode()).hexdigest()[:40]


def dataset_bytes(part10: bytes) -> bytes:
    """The encoded data set of a DICOM Part 10 byte string (preamble and file meta removed).

    The file meta group is always Explicit VR Little Endian; it is walked element by element so
    that files without a group length element work too. Two instances whose data sets are equal
    byte for byte are the same content even if another application wrote their file meta.
    """
    pos = 132 if part10[128:132] == b"DICM" else 0
    while pos + 8 <= len(part10):
        group = struct.unpack_from("<H", part10, pos)[0]
        if group != 0x0002:
            break
        vr = part10[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", part10, pos + 8)[0]
            pos += 12 + length
        else:
            length = struct.unpack_from("<H", part10, pos + 6)[0]
            pos += 8 + length
    return part10[pos:]


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def part10_head(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation: tuple[str, str],
    source_ae: str = "",
) -> bytes:
    """Preamble, prefix and file meta group (Explicit VR Little Endian) of a Part 10 file.

    Args:
        sop_class_uid: Media Storage SOP Class UID.
        sop_instance_uid: Media Storage SOP Instance UID.
        transfer_syntax_uid: Transfer syntax of the data set that follows.
        implementation: Implementation Class UID and Version Name of the writer.
        source_ae: Source Application Entity Title (the peer that sent it), if known.
    """
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\0")),
            _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\0")),
            _meta_element(0x0010, b"UI", _padded(transfer_syntax_uid, b"\0")),
            _meta_element(0x0012, b"UI", _padded(implementation[0], b"\0")),
            _meta_element(0x0013, b"SH", _padded(implementation[1][:16], b" ")),
            _meta_element(0x0016, b"AE", _padded(source_ae[:16], b" ")) if source_ae else b"",
        )
    )
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\0" * 128 + b"DICM" + length + body


@dataclass(frozen=True)
class Sidecar:
    """What the spool knows about a study besides its files.

    Attributes:
        study_uid: StudyInstanceUID (derived by the ingest rule when the instances carry none).
        calling_ae: AE title of the peer of the last association that sent instances of it.
        called_ae: The AE title that peer called.
        interrupted: Whether that association did not end by an orderly release (aborted, the
            connection dropped, or still open when the process stopped).
        updated_at: Unix time of the last update.
    """

    study_uid: str
    calling_ae: str = ""
    called_ae: str = ""
    interrupted: bool = True
    updated_at: float = 0.0


@dataclass(frozen=True)
class SpooledStudy:
    """A study folder waiting in the spool.

    Attributes:
        tenant_id: Owner.
        key: The folder name (:func:`study_key`).
        path: The folder.
        last_arrival: Unix time of the last change (folder mtime: each arrival links a file in).
    """

    tenant_id: str
    key: str
    path: Path
    last_arrival: float


@dataclass(frozen=True)
class Claimed:
    """A study folder this process renamed away from the live spool: it alone ingests it."""

    tenant_id: str
    key: str
    path: Path

    def files(self) -> list[Path]:
        """The instance files (temporary files of interrupted writes are left out)."""
        return sorted(p for p in self.path.glob("*.dcm") if not p.name.startswith("."))

    def sidecar(self) -> Sidecar | None:
        """The study's sidecar, if one was written."""
        return read_sidecar(self.path)


def read_sidecar(folder: Path) -> Sidecar | None:
    """The sidecar of a study folder, or ``None`` when it is missing or unreadable."""
    try:
        raw = json.loads((folder / SIDECAR).read_text(encoding="utf-8"))
        return Sidecar(**raw)
    except (OSError, ValueError, TypeError):
        return None


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries to disk (a new link survives a power failure)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _owner_alive(owner: str) -> bool:
    """Whether the process named in a claim suffix (``host-pid-token``) still runs."""
    host, _, rest = owner.rpartition("-")[0].rpartition("-")
    if host != socket.gethostname():
        return True  # another machine's claim: not ours to judge
    try:
        os.kill(int(rest), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class Spool:
    """The spool folder of one data directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def tenant_dir(self, tenant_id: str) -> Path:
        """Folder of one tenant's studies."""
        if not tenant_id or not set(tenant_id) <= _HEX:
            raise ValueError("not a voxelgate tenant id")
        return self.root / tenant_id

    def study_dir(self, tenant_id: str, study_uid: str) -> Path:
        """Live folder of a study (may not exist yet)."""
        return self.tenant_dir(tenant_id) / study_key(tenant_id, study_uid)

    # -- the C-STORE side ---------------------------------------------------------------------
    def existing(self, tenant_id: str, study_uid: str, sop_instance_uid: str) -> Path | None:
        """The spooled file of an instance, if there is one in the study's live folder."""
        path = self.study_dir(tenant_id, study_uid) / f"{instance_key(sop_instance_uid)}.dcm"
        return path if path.exists() else None

    def write_instance(
        self,
        tenant_id: str,
        study_uid: str,
        sop_instance_uid: str,
        head: bytes,
        dataset: bytes,
        *,
        durable: bool = False,
    ) -> WriteOutcome:
        """Store one instance (``head`` + ``dataset``) atomically in its study's live folder.

        Args:
            tenant_id: Owner.
            study_uid: Its StudyInstanceUID (names the folder).
            sop_instance_uid: Its SOPInstanceUID (names the file).
            head: Preamble and file meta (:func:`part10_head`).
            dataset: The encoded data set.
            durable: Flush the file and its folder entry to disk before returning.

        Returns:
            ``"stored"``; ``"identical"`` when the instance was spooled before with the same data
            set (nothing written); ``"differs"`` when it was spooled with another data set (the
            spooled file is kept unchanged).
        """
        name = f"{instance_key(sop_instance_uid)}.dcm"
        folder = self.study_dir(tenant_id, study_uid)
        tmp = folder / f".{name}.{threading.get_ident()}.part"  # one writer per thread
        for _ in range(3):  # the folder may be claimed (renamed away) at any moment
            try:
                handle = open(tmp, "wb")  # noqa: SIM115 - closed below, before the link
            except FileNotFoundError:
                folder.mkdir(parents=True, exist_ok=True)
                continue
            try:
                with handle:
                    handle.write(head)
                    handle.write(dataset)
                    if durable:
                        handle.flush()
                        os.fsync(handle.fileno())
                os.link(tmp, folder / name)
            except FileExistsError:
                return self._compare(folder / name, dataset)
            except FileNotFoundError:
                continue
            finally:
                tmp.unlink(missing_ok=True)
            if durable:
                _fsync_dir(folder)
            return "stored"
        raise OSError("spool folder kept disappearing while writing an instance")

    @staticmethod
    def _compare(path: Path, dataset: bytes) -> WriteOutcome:
        same = dataset_bytes(path.read_bytes()) == dataset
        return "identical" if same else "differs"

    def write_sidecar(self, tenant_id: str, sidecar: Sidecar, *, create: bool) -> None:
        """Write a study's sidecar atomically (only into an existing folder unless ``create``)."""
        folder = self.study_dir(tenant_id, sidecar.study_uid)
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            return  # claimed meanwhile: the ingest has its own sidecar
        tmp = folder / f".{SIDECAR}.{uuid.uuid4().hex[:8]}"
        body = asdict(sidecar) | {"updated_at": time.time()}
        try:
            tmp.write_text(json.dumps(body), encoding="utf-8")
            os.replace(tmp, folder / SIDECAR)
        except FileNotFoundError:
            pass  # the folder was claimed between the check and the write
        finally:
            tmp.unlink(missing_ok=True)

    # -- retrieves of ours (C-MOVE to the listener) -------------------------------------------
    def expect(self, tenant_id: str, study_uid: str, ttl_s: float) -> None:
        """Mark a study as being brought by our own C-MOVE for the next ``ttl_s`` seconds.

        Until then the flusher leaves the study to the retrieve's :func:`flush_study`; a marker
        left by a retrieve that died expires, and the study is then ingested without routing.
        """
        base = self.tenant_dir(tenant_id) / EXPECTED
        base.mkdir(parents=True, exist_ok=True)
        key = study_key(tenant_id, study_uid)
        tmp = base / f".{key}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(repr(time.time() + ttl_s), encoding="utf-8")
        os.replace(tmp, base / key)

    def expected_until(self, tenant_id: str, key: str) -> float | None:
        """Expiry time of a study's retrieve marker (``None``: no marker, a normal arrival)."""
        try:
            return float((self.tenant_dir(tenant_id) / EXPECTED / key).read_text("utf-8"))
        except (FileNotFoundError, ValueError):
            return None

    def unexpect(self, tenant_id: str, key: str) -> None:
        """Remove a study's retrieve marker."""
        (self.tenant_dir(tenant_id) / EXPECTED / key).unlink(missing_ok=True)

    # -- the flushing side --------------------------------------------------------------------
    def tenants(self) -> list[str]:
        """Tenant ids that have a spool folder."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and set(p.name) <= _HEX)

    def studies(self, tenant_id: str) -> Iterator[SpooledStudy]:
        """The live study folders of a tenant with their last arrival time."""
        base = self.tenant_dir(tenant_id)
        if not base.is_dir():
            return
        for entry in os.scandir(base):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                mtime = entry.stat().st_mtime
            except FileNotFoundError:
                continue  # claimed meanwhile
            yield SpooledStudy(tenant_id, entry.name, Path(entry.path), mtime)

    def claim(self, tenant_id: str, key: str) -> Claimed | None:
        """Take a live study folder for ingest (atomic rename); ``None`` if another process won."""
        base = self.tenant_dir(tenant_id)
        (base / CLAIMED).mkdir(exist_ok=True)
        target = base / CLAIMED / f"{key}.{_owner()}"
        try:
            os.rename(base / key, target)
        except FileNotFoundError:
            return None
        return Claimed(tenant_id, key, target)

    def claim_study(self, tenant_id: str, study_uid: str) -> Claimed | None:
        """Claim the live folder of ``study_uid``, if any."""
        return self.claim(tenant_id, study_key(tenant_id, study_uid))

    def orphaned_claims(self, tenant_id: str) -> Iterator[Claimed]:
        """Re-claim folders claimed by processes of this machine that no longer run."""
        base = self.tenant_dir(tenant_id) / CLAIMED
        if not base.is_dir():
            return
        for entry in sorted(base.iterdir()):
            key, _, owner = entry.name.partition(".")
            if _owner_alive(owner):
                continue
            target = base / f"{key}.{_owner()}"
            try:
                os.rename(entry, target)
            except FileNotFoundError:
                continue
            yield Claimed(tenant_id, key, target)

    def finish(self, claimed: Claimed) -> None:
        """Remove an ingested folder."""
        shutil.rmtree(claimed.path, ignore_errors=True)

    def quarantine(self, claimed: Claimed) -> Path:
        """Keep a refused folder under ``.failed`` for an operator; returns its new path."""
        base = self.tenant_dir(claimed.tenant_id) / FAILED
        base.mkdir(exist_ok=True)
        target = base / claimed.path.name
        os.rename(claimed.path, target)
        return target

    def unclaim(self, claimed: Claimed) -> None:
        """Give a claimed folder back to the live spool (to be ingested again later).

        Files move back one by one without overwriting what arrived meanwhile; the sidecar is
        kept only if no newer one was written.
        """
        live = self.tenant_dir(claimed.tenant_id) / claimed.key
        live.mkdir(parents=True, exist_ok=True)
        for path in claimed.path.iterdir():
            if path.name.startswith("."):
                continue
            with contextlib.suppress(FileExistsError):
                os.link(path, live / path.name)
        shutil.rmtree(claimed.path, ignore_errors=True)


def spool_for(settings: Settings) -> Spool:
    """The spool of ``settings``: ``<data_dir>/spool``."""
    return Spool(settings.data_dir / "spool")
