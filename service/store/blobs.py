"""Blob storage on a local (or network-mounted) filesystem: the only code that builds paths.

Layout under ``root``::

    staging/<token>/                          uploads being received and validated
    studies/<study id>/<series id>/<file>     stored instances, UID-addressed
    jobs/<job id>/attempts/<run token>/      one attempt's outputs (the job row names the winner)
    scratch/                                  short-lived files (zips being served)

Every file and folder becomes visible by an atomic rename from a sibling temporary name, so a
reader never sees a partial blob. Ids are validated before they touch a path.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.settings import Settings

_ID = re.compile(r"^[0-9a-f]{32}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _check_id(value: str) -> str:
    if not _ID.match(value):
        raise ValueError(f"not a voxelgate id: {value[:40]!r}")
    return value


def instance_file_name(sop_instance_uid: str, suffix: str = ".dcm") -> str:
    """File name of one stored instance: the UID itself when it is a valid DICOM UID, else a hash.

    Args:
        sop_instance_uid: SOPInstanceUID (or the name given to a non-DICOM file).
        suffix: File suffix, e.g. ``".dcm"`` or ``".nii.gz"``.
    """
    if _UID.match(sop_instance_uid) and len(sop_instance_uid) <= 64:
        return sop_instance_uid + suffix
    return hashlib.sha256(sop_instance_uid.encode()).hexdigest() + suffix


class BlobStore:
    """Filesystem blob store rooted at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        for sub in ("staging", "studies", "jobs", "scratch"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- staging -----------------------------------------------------------------------------
    @contextmanager
    def staging_area(self) -> Iterator[Path]:
        """Yield a fresh private folder for an upload; it is removed afterwards, always."""
        path = Path(tempfile.mkdtemp(prefix="upload-", dir=self.root / "staging"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def scratch_file(self, suffix: str) -> Path:
        """Return the path of a new empty scratch file (the caller deletes it)."""
        fd, name = tempfile.mkstemp(suffix=suffix, dir=self.root / "scratch")
        os.close(fd)
        return Path(name)

    # -- studies -----------------------------------------------------------------------------
    def series_dir(self, study_id: str, series_id: str) -> Path:
        """Folder of one stored series."""
        return self.root / "studies" / _check_id(study_id) / _check_id(series_id)

    def instance_key(self, study_id: str, series_id: str, file_name: str) -> str:
        """Storage key (relative path) of one instance."""
        if "/" in file_name or file_name.startswith("."):
            raise ValueError(f"bad blob file name {file_name[:40]!r}")
        return f"studies/{_check_id(study_id)}/{_check_id(series_id)}/{file_name}"

    def path_of(self, key: str) -> Path:
        """Absolute path of a storage key (refuses keys that leave the store)."""
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"blob key outside the store: {key[:60]!r}")
        return path

    def put_file(self, source: Path, key: str) -> bool:
        """Move ``source`` to ``key`` atomically unless the key exists already.

        Returns:
            True if the file was stored, False if a blob with that key was already there (the
            existing blob is never overwritten).
        """
        dest = self.path_of(key)
        if dest.exists():
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        shutil.move(str(source), tmp)
        os.replace(tmp, dest)
        return True

    def delete_keys(self, keys: list[str]) -> None:
        """Remove the given blobs (missing ones are ignored)."""
        for key in keys:
            self.path_of(key).unlink(missing_ok=True)

    def delete_study(self, study_id: str) -> None:
        """Remove every blob of a study."""
        shutil.rmtree(self.root / "studies" / _check_id(study_id), ignore_errors=True)

    # -- jobs --------------------------------------------------------------------------------
    def job_outputs_dir(self, job_id: str) -> Path:
        """Folder of a job's outputs (created atomically by the writer)."""
        return self.root / "jobs" / _check_id(job_id) / "outputs"

    def delete_job(self, job_id: str) -> None:
        """Remove a job's outputs."""
        shutil.rmtree(self.root / "jobs" / _check_id(job_id), ignore_errors=True)

    def attempt_dir(self, job_id: str, run_token: str) -> Path:
        """Folder of one attempt's outputs (the job's outputs only if the attempt wins)."""
        return self.root / "jobs" / _check_id(job_id) / "attempts" / _check_id(run_token)

    def key_of(self, path: Path) -> str:
        """Storage key (relative path) of a file inside the store."""
        resolved = Path(path).resolve()
        if self.root not in resolved.parents:
            raise ValueError("path outside the store")
        return resolved.relative_to(self.root).as_posix()


def blob_store(settings: Settings) -> BlobStore:
    """The blob store of ``settings``: ``<data_dir>/blobs``."""
    return BlobStore(settings.data_dir / "blobs")
