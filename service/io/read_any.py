"""One entry point for every accepted input format.

Dispatch by name and content: ``.nii``/``.nii.gz`` -> NIfTI; ``.nrrd``/``.nhdr``/``.mha``/``.mhd``
-> SimpleITK; a folder, a ``.zip`` archive or a DICOM Part 10 file (``DICM`` preamble, or a
``.dcm`` name) -> DICOM series. Anything else is refused with the list of accepted formats.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.errors import InputRejected
from models.volume import Volume

from .dicom_files import has_dicm_preamble
from .dicom_series import DicomSeries, load_dicom_series
from .itk_image import read_itk_image
from .nifti import read_nifti

ACCEPTED_FORMATS = (
    "DICOM (folder, .zip or single file), NIfTI (.nii, .nii.gz), "
    "NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd)"
)
_ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")

InputKind = Literal["dicom", "nifti", "itk"]


@dataclass
class LoadedInput:
    """A loaded input volume.

    Attributes:
        volume: Voxels ``[k, j, i]`` with their LPS affine.
        dicom: The DICOM series (template, SOP UIDs) when the input was DICOM, else ``None``.
        kind: ``"dicom"``, ``"nifti"`` or ``"itk"``.
    """

    volume: Volume
    dicom: DicomSeries | None
    kind: InputKind


def detect_kind(path: Path) -> InputKind:
    """Classify an input path.

    Args:
        path: File or folder.

    Returns:
        The reader family.

    Raises:
        InputRejected: Missing path or unrecognised format (the message lists accepted formats).
    """
    path = Path(path)
    if not path.exists():
        raise InputRejected(f"{path}: no such file or folder")
    name = path.name.lower()
    if path.is_dir():
        return "dicom"
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(_ITK_SUFFIXES):
        return "itk"
    if name.endswith((".zip", ".dcm")) or has_dicm_preamble(path) or zipfile.is_zipfile(path):
        return "dicom"
    raise InputRejected(f"{path}: unrecognised input format; accepted: {ACCEPTED_FORMATS}")


def read_volume(
    path: Path, series_uid: str | None = None, allow_missing_study_uid: bool = False
) -> LoadedInput:
    """Read any accepted input as a Volume.

    Args:
        path: DICOM folder/zip/file, NIfTI, NRRD or MetaImage file.
        series_uid: For DICOM sources with several series, the SeriesInstanceUID to load.
        allow_missing_study_uid: For DICOM, accept an empty StudyInstanceUID.

    Returns:
        The :class:`LoadedInput`.

    Raises:
        InputRejected: Unrecognised format or any reader refusal.
    """
    path = Path(path)
    kind = detect_kind(path)
    if kind == "nifti":
        return LoadedInput(volume=read_nifti(path), dicom=None, kind="nifti")
    if kind == "itk":
        return LoadedInput(volume=read_itk_image(path), dicom=None, kind="itk")
    series = load_dicom_series(
        path, series_uid=series_uid, allow_missing_study_uid=allow_missing_study_uid
    )
    return LoadedInput(volume=series.volume, dicom=series, kind="dicom")
