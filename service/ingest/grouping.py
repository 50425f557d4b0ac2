"""Group the scanned files of one upload into studies and series.

* Every file is scanned first (:func:`scan_upload`); the first unacceptable file refuses the whole
  upload, naming it.
* One upload holds one patient: DICOM files whose :func:`~service.ingest.scan.patient_key`
  differs are refused (:func:`check_single_patient`). NIfTI files carry no patient attributes
  and are not compared.
* Files are grouped by (StudyInstanceUID, SeriesInstanceUID), derived ones included; a series'
  modality, description and geometry come from its files (:func:`group_studies`).
* The same SOPInstanceUID twice in one upload keeps the first file; the others are counted as
  duplicates by the store.
* NIfTI: each file is one study with one series (kind ``"nifti"``), all three UIDs derived from
  the file's SHA-256; modality: the caller's value (upload ``nifti_modality``), else the
  voxelgate header extension, else ``"OT"``. A caller's value that differs from the modality the
  file's voxelgate header names (other than ``"OT"``) refuses the upload: a file is never
  relabelled. The worker applies the stored modality when it reads the file (a CT is HU).
* Sinogram bundles (:mod:`service.ingest.sinogram_bundle`): each is one study with one series
  (kind ``"sinogram"``) of two files, the geometry JSON and its data; modality from the JSON.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.errors import InputRejected
from service.ingest.geometry import dicom_series_geometry
from service.ingest.scan import ScannedFile, scan_file
from service.ingest.sinogram_bundle import split_sinogram_bundles

_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")


@dataclass
class SeriesGroup:
    """The files of one series in one upload.

    Attributes:
        series_uid: SeriesInstanceUID (possibly derived).
        uid_derived: Whether any UID of the series or its instances was derived.
        kind: ``"dicom"``, ``"nifti"`` or ``"sinogram"``.
        modality: Modality code.
        description: SeriesDescription (NIfTI: the file name).
        series_number: SeriesNumber or ``None``.
        body_part: BodyPartExamined of the first file (``""`` when absent).
        files: The scanned files, in upload order.
        geometry: Geometry summary (:mod:`service.ingest.geometry`).
    """

    series_uid: str
    uid_derived: bool
    kind: str
    modality: str
    description: str
    series_number: int | None
    body_part: str = ""
    files: list[ScannedFile] = field(default_factory=list)
    geometry: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyGroup:
    """The series of one study in one upload.

    Attributes:
        study_uid: StudyInstanceUID (possibly derived).
        uid_derived: Whether the StudyInstanceUID was derived.
        study_date: StudyDate ``YYYYMMDD`` or ``""``.
        patient_key: Keyed patient hash (``""`` for NIfTI).
        series: Series by SeriesInstanceUID, in upload order.
    """

    study_uid: str
    uid_derived: bool
    study_date: str
    patient_key: str
    series: dict[str, SeriesGroup] = field(default_factory=dict)


def scan_upload(files: Sequence[Path], tenant_id: str) -> list[ScannedFile]:
    """Scan every file of an upload (DICOMDIR files are dropped).

    Raises:
        InputRejected: The first file that is not acceptable (named by its upload name), or an
            upload without any file to store.
    """
    bundles, rest = split_sinogram_bundles([Path(f) for f in files])
    scanned = [s for s in (scan_file(Path(f), tenant_id) for f in rest) if s is not None]
    if not scanned and not bundles:
        raise InputRejected("the upload holds no DICOM instance, NIfTI image or sinogram bundle")
    return bundles + scanned


def check_single_patient(scanned: Sequence[ScannedFile]) -> str:
    """Return the one patient key of the upload's DICOM files (``""`` when there are none).

    Raises:
        InputRejected: The DICOM files belong to more than one patient (PatientID/PatientName
            differ); the message names the first file of a second patient, never the patient.
    """
    dicom = [s for s in scanned if s.kind == "dicom"]
    if not dicom:
        return ""
    first = dicom[0]
    keys = {s.patient_key for s in dicom}
    if len(keys) > 1:
        other = next(s for s in dicom if s.patient_key != first.patient_key)
        raise InputRejected(
            f"the upload mixes {len(keys)} patients (PatientID/PatientName of {other.label} "
            f"differ from {first.label}); upload one patient per request"
        )
    return first.patient_key


def check_modality(modality: str) -> str:
    """Validate a caller-given modality code (upper case letters/digits, at most 16)."""
    if not _MODALITY.match(modality):
        raise InputRejected(
            f"modality {modality[:20]!r} is not a DICOM modality code (e.g. CT, MR, OT)"
        )
    return modality


def _nifti_modality(item: ScannedFile, declared: str) -> str:
    """A NIfTI series' modality: declared, else its voxelgate header's, else ``"OT"``.

    Raises:
        InputRejected: The declared modality differs from the one the file's header names.
    """
    own = item.modality if item.modality != "OT" else ""
    if declared and own and declared != own:
        raise InputRejected(
            f"{item.label}: declared nifti_modality {declared}, but the file's voxelgate header "
            f"says it is {own}; declare {own} (or nothing) rather than relabelling it"
        )
    return declared or item.modality or "OT"


def group_studies(scanned: Sequence[ScannedFile], nifti_modality: str = "") -> list[StudyGroup]:
    """Group scanned files into studies and series, and summarise each series' geometry.

    Args:
        scanned: Output of :func:`scan_upload` (one patient, see :func:`check_single_patient`).
        nifti_modality: Modality of NIfTI files; ``""``: from the file's voxelgate header
            extension, else ``"OT"``.

    Returns:
        Studies in upload order.

    Raises:
        InputRejected: An invalid ``nifti_modality``, or one that differs from the modality a
            NIfTI file's voxelgate header names.
    """
    if nifti_modality:
        check_modality(nifti_modality)
    studies: dict[str, StudyGroup] = {}
    for item in scanned:
        study = studies.get(item.study_uid)
        if study is None:
            study = StudyGroup(
                study_uid=item.study_uid,
                uid_derived="study" in item.derived,
                study_date=item.study_date,
                patient_key=item.patient_key,
            )
            studies[item.study_uid] = study
        series = study.series.get(item.series_uid)
        if series is None:
            modality = item.modality
            if item.kind == "nifti":
                modality = _nifti_modality(item, nifti_modality)
            series = SeriesGroup(
                series_uid=item.series_uid,
                uid_derived=False,
                kind=item.kind,
                modality=modality,
                description=item.description,
                series_number=item.series_number,
                body_part=item.body_part,
            )
            study.series[item.series_uid] = series
        series.uid_derived = series.uid_derived or bool(item.derived)
        series.files.append(item)
    for study in studies.values():
        for series in study.series.values():
            series.geometry = _series_geometry(series)
    return list(studies.values())


def _series_geometry(series: SeriesGroup) -> dict[str, Any]:
    """Geometry of a series: NIfTI header, sinogram JSON summary, or DICOM slices (first/UID)."""
    if series.kind == "nifti":
        return dict(series.files[0].nifti_geometry or {})
    if series.kind == "sinogram":
        return dict(series.files[0].sinogram_geometry or {})
    unique: dict[str, ScannedFile] = {}
    for item in series.files:
        unique.setdefault(item.sop_instance_uid, item)
    files = list(unique.values())
    return dicom_series_geometry(
        [f.slices for f in files], [f.geometry_error for f in files], files[0].slice_thickness
    )
