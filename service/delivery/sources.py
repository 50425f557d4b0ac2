"""The files a delivery sends: a job's DICOM outputs (``*_dicom.zip``), extracted safely."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.delivery.errors import DeliveryFailed
from service.ingest.archive import ExpansionBudget, extract_zip
from service.settings import Settings
from service.store.blobs import BlobStore

DICOM_ZIP_SUFFIX = "_dicom.zip"


def dicom_output_names(outputs: dict[str, Any]) -> list[str]:
    """Names of a job's outputs that are DICOM series zips, sorted."""
    return sorted(name for name in outputs if name.endswith(DICOM_ZIP_SUFFIX))


def extract_dicom_outputs(
    settings: Settings, blobs: BlobStore, outputs: dict[str, Any], dest: Path
) -> list[Path]:
    """Extract every DICOM output zip of a job below ``dest``, one folder per zip.

    Args:
        settings: Archive limits (the same as for uploads).
        blobs: The blob store holding the outputs.
        outputs: The job's ``outputs`` (``{name: {"key": ...}}``).
        dest: Empty staging folder on the store's file system.

    Returns:
        The extracted files, zip by zip in name order.

    Raises:
        DeliveryFailed: (``retry=False``) The job has no DICOM output, or one is missing from
            the store or unreadable.
    """
    names = dicom_output_names(outputs)
    if not names:
        raise DeliveryFailed("the job has no DICOM outputs to deliver", retry=False)
    budget = ExpansionBudget.from_settings(settings)
    files: list[Path] = []
    for index, name in enumerate(names):
        path = blobs.path_of(outputs[name]["key"])
        if not path.is_file():
            raise DeliveryFailed(f"output {name} is no longer stored", retry=False)
        try:
            files += extract_zip(path, dest / f"{index:03d}", name, settings, budget)
        except Exception as exc:  # InputRejected, PayloadTooLarge: a resend would not help
            raise DeliveryFailed(f"output {name} cannot be extracted: {exc}", retry=False) from exc
    return sorted(files)
