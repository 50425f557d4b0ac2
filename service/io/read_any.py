"""One entry point for every accepted input format.

Dispatch by name and content: ``.nii``/``.nii.gz`` -> NIfTI; ``.nrrd``/``.nhdr``/``.mha``/``.mhd``
-> SimpleITK; a folder, a ``.zip`` archive or a DICOM Part 10 file (``DICM`` preamble, or a
``.dcm`` name) -> DICOM series. Anything else is refused with the list of accepted formats.

A declared modality (:func:`declare_modality`; API upload ``nifti_modality``, CLI ``--modality``)
fills in what a format does not record: a volume read as ``"OT"`` (NIfTI not written by
voxelgate, NRRD, MetaImage) takes the declared modality, and a declared CT gets
``units="HU"`` (the declaration is the user's statement that the values are Hounsfield units).
A volume whose file names another modality is refused, never relabelled; one whose file names
the declared modality keeps its own units (an uncalibrated DICOM CT stays not-HU).
"""

from __future__ import annotations

import dataclasses
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

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


def declare_modality(volume: Volume, modality: str | None, what: str) -> Volume:
    """Apply a declared modality to a volume (the rule of the module docstring).

    Args:
        volume: As read.
        modality: Declared DICOM modality code (e.g. ``"CT"``, case-insensitive); ``None`` or
            ``""``: nothing declared, ``volume`` is returned as it is.
        what: How to name the input in a refusal (its path, or ``"series <id>"``).

    Returns:
        ``volume`` itself when it already has the declared modality (its units kept), else a
        copy with the declared modality; a declared CT is then float32 with ``units="HU"``.

    Raises:
        InputRejected: The file names another modality than the declared one.
    """
    if not modality:
        return volume
    modality = modality.upper()
    if volume.modality == modality:
        return volume
    if volume.modality != "OT":
        raise InputRejected(
            f"{what}: declared modality {modality}, but the file says it is {volume.modality}; "
            "declare its own modality (or none) rather than relabelling it"
        )
    if modality != "CT":
        return volume.with_array(volume.array, modality=modality)
    array = volume.array.astype(np.float32, copy=False)  # HU is float32, as the readers give CT
    return volume.with_array(array, modality="CT", units="HU")


def read_volume(
    path: Path,
    series_uid: str | None = None,
    allow_missing_study_uid: bool = False,
    modality: str | None = None,
) -> LoadedInput:
    """Read any accepted input as a Volume.

    Args:
        path: DICOM folder/zip/file, NIfTI, NRRD or MetaImage file.
        series_uid: For DICOM sources with several series, the SeriesInstanceUID to load.
        allow_missing_study_uid: For DICOM, accept an empty StudyInstanceUID.
        modality: Declared modality (:func:`declare_modality`); ``None``: as the file says.

    Returns:
        The :class:`LoadedInput`.

    Raises:
        InputRejected: Unrecognised format, any reader refusal, or a file whose own modality
            differs from the declared one.
    """
    path = Path(path)
    kind = detect_kind(path)
    if kind == "nifti":
        volume = declare_modality(read_nifti(path), modality, str(path))
        return LoadedInput(volume=volume, dicom=None, kind="nifti")
    if kind == "itk":
        volume = declare_modality(read_itk_image(path), modality, str(path))
        return LoadedInput(volume=volume, dicom=None, kind="itk")
    series = load_dicom_series(
        path, series_uid=series_uid, allow_missing_study_uid=allow_missing_study_uid
    )
    if modality:
        series = dataclasses.replace(
            series, volume=declare_modality(series.volume, modality, str(path))
        )
    return LoadedInput(volume=series.volume, dicom=series, kind="dicom")
