"""Per-file header scan of an upload: what each file is, its UIDs and its slice geometry.

Every file must be a DICOM Part 10 instance (``DICM`` marker at byte 128) or a NIfTI-1/2 image
(``.nii``, or gzip-compressed ``.nii.gz``; recognised by content, not by name). Anything else is
refused with :class:`~models.errors.InputRejected` naming the file by its *upload* name (see
:func:`upload_label`); messages never carry a patient attribute. DICOMDIR files are skipped.

Headers are read without keeping pixel data in memory (pydicom ``defer_size``), but a DICOM file
whose pixel data ends early is refused as truncated, and a ``.nii.gz`` is decompressed once in
1 MiB chunks to prove that it is complete.

Patient identity is reduced at once to :func:`patient_key`, a keyed hash; names and IDs are never
kept. Empty UIDs are replaced by deterministic ``2.25.<int>`` UIDs (:func:`derive_uid`) computed
from stable header fields, so that uploading the same files again finds the same rows.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import types
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from models.errors import InputRejected
from models.provenance import file_sha256
from models.volume import from_ijk_order, ras_to_lps
from service.ingest.geometry import geometry_summary
from service.io.dicom_files import _str, has_dicm_preamble
from service.io.dicom_geometry import _instance_slices, _Slice
from service.io.nifti import _extension_fields, _ras_affine

CHUNK_BYTES = 1024 * 1024
UPLOAD_MARKER = ".vgupload"
"""Suffix of the per-part folders :mod:`service.ingest.receive` creates in the staging area."""

MAX_UID_LENGTH = 64
NIFTI_HEAD_BYTES = 1024 * 1024
"""Most bytes read to parse a NIfTI header and its extensions."""

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_ACCEPTED = (
    "DICOM Part 10 files (optionally in a .zip), NIfTI images (.nii, .nii.gz), or sinogram "
    "bundles (a voxelgate-sinogram/1 geometry JSON with its .npy/.tif/.nii data file)"
)

FileKind = Literal["dicom", "nifti", "sinogram"]


@dataclass
class ScannedFile:
    """What the header scan learnt about one file (no patient attribute, no pixel data).

    Attributes:
        path: The file in the staging area.
        label: Its upload name, for messages.
        kind: ``"dicom"``, ``"nifti"`` or ``"sinogram"`` (a file of a sinogram bundle).
        size: Bytes.
        sha256: Hex digest of the file content.
        sop_instance_uid: SOPInstanceUID; else MediaStorageSOPInstanceUID; else derived.
        study_uid: StudyInstanceUID (derived when empty).
        series_uid: SeriesInstanceUID (derived when empty).
        derived: Which UIDs were derived: subset of ``{"study", "series", "instance"}``.
        patient_key: Keyed hash of PatientID + PatientName (``""`` for NIfTI).
        modality: Modality code.
        description: SeriesDescription (NIfTI: the upload file name).
        body_part: BodyPartExamined (``""`` when absent; NIfTI: ``""``).
        study_date: StudyDate ``YYYYMMDD`` or ``""``.
        series_number: SeriesNumber or ``None``.
        slices: Slice geometry (DICOM images), or ``None`` with ``geometry_error`` set.
        geometry_error: Why the file has no usable 3D geometry (``""`` if it has).
        slice_thickness: A header holding SpacingBetweenSlices/SliceThickness (one-slice step).
        nifti_geometry: Geometry summary of a NIfTI file.
        nifti_gzip: Whether the NIfTI file is gzip-compressed.
        sinogram_geometry: Sinogram bundles: the summary of the geometry JSON (both files of a
            bundle carry it).
        stored_suffix: Sinogram bundles: the suffix the stored file keeps (``.json``,
            ``.npy``, ...).
    """

    path: Path
    label: str
    kind: FileKind
    size: int
    sha256: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    derived: set[str] = field(default_factory=set)
    patient_key: str = ""
    modality: str = ""
    description: str = ""
    body_part: str = ""
    study_date: str = ""
    series_number: int | None = None
    slices: list[_Slice] | None = None
    geometry_error: str = ""
    slice_thickness: Dataset | None = None
    nifti_geometry: dict[str, Any] | None = None
    nifti_gzip: bool = False
    sinogram_geometry: dict[str, Any] | None = None
    stored_suffix: str = ""


def upload_label(path: Path) -> str:
    """Upload name of a staged file: the path below its ``NNNN.vgupload`` folder, else its name."""
    parts = Path(path).parts
    for n, part in enumerate(parts):
        if part.endswith(UPLOAD_MARKER) and n + 1 < len(parts):
            return "/".join(parts[n + 1 :])
    return Path(path).name


def patient_key(tenant_id: str, patient_id: str, patient_name: str) -> str:
    """Keyed hash (HMAC-SHA256, key derived from the tenant) of a patient's ID and name.

    Equal for the same patient within one tenant, unlinkable across tenants, and not reversible
    without guessing the identifiers. Only this value is stored.
    """
    key = f"voxelgate/patient-key/{tenant_id}".encode()
    message = f"{patient_id.strip()}\x00{patient_name.strip().rstrip('^')}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def derive_uid(purpose: str, *fields: str) -> str:
    """Deterministic DICOM UID ``2.25.<int>`` from ``fields`` (128 bits of their SHA-256)."""
    digest = hashlib.sha256("\x1f".join((purpose, *fields)).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def scan_file(path: Path, tenant_id: str, label: str | None = None) -> ScannedFile | None:
    """Scan one file of an upload.

    Args:
        path: File in the staging area.
        tenant_id: The uploading tenant (keys the patient hash).
        label: Upload name for messages; default :func:`upload_label`.

    Returns:
        The :class:`ScannedFile`, or ``None`` for a file to skip (DICOMDIR).

    Raises:
        InputRejected: Empty, unrecognised, corrupt or truncated file; UID longer than 64.
    """
    label = label or upload_label(path)
    size = path.stat().st_size
    if size == 0:
        raise InputRejected(f"{label}: empty file; accepted: {_ACCEPTED}")
    if has_dicm_preamble(path):
        return _scan_dicom(path, label, size, tenant_id)
    header = _nifti_header(path)
    if header is not None:
        return _scan_nifti(path, label, size, header[0], header[1])
    raise InputRejected(f"{label}: not a DICOM Part 10 file or NIfTI image; accepted: {_ACCEPTED}")


# -- DICOM -------------------------------------------------------------------------------------


def _read_dicom(path: Path, label: str) -> Dataset:
    """Header and deferred pixel data of a DICOM file; refuses corrupt and truncated files."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, defer_size=CHUNK_BYTES)
    except InvalidDicomError as exc:
        raise InputRejected(f"{label}: not a valid DICOM file ({exc})") from exc
    except Exception as exc:  # pydicom raises many types on corrupt headers
        raise InputRejected(
            f"{label}: corrupt or truncated DICOM file ({type(exc).__name__})"
        ) from exc
    if any("End of file reached" in str(w.message) for w in caught):
        raise InputRejected(f"{label}: truncated DICOM file (unexpected end of file)")
    return ds


def _check_pixels(ds: Dataset, size: int, label: str) -> None:
    """Refuse an image whose pixel data is missing or ends beyond the end of the file."""
    if "Rows" not in ds:
        return
    elements = [ds.get_item(k, keep_deferred=True) for k in _PIXEL_KEYWORDS if k in ds]
    if not elements:
        raise InputRejected(f"{label}: DICOM image without pixel data (truncated file?)")
    for element in elements:
        tell = getattr(element, "value_tell", None)
        length = getattr(element, "length", None)
        defined = length is not None and length != 0xFFFFFFFF
        if tell is not None and defined and tell + length > size:
            raise InputRejected(
                f"{label}: truncated DICOM file (pixel data needs {tell + length} bytes, file "
                f"has {size})"
            )


def _uid(ds: Dataset, keyword: str, label: str) -> str:
    value = _str(ds, keyword)
    if len(value) > MAX_UID_LENGTH:
        raise InputRejected(f"{label}: {keyword} is longer than {MAX_UID_LENGTH} characters")
    return value


def _sop_uid(ds: Dataset, label: str) -> str:
    uid = _uid(ds, "SOPInstanceUID", label)
    meta = getattr(ds, "file_meta", None)
    if not uid and meta is not None:
        uid = _uid(meta, "MediaStorageSOPInstanceUID", label)
    return uid


def _series_number(ds: Dataset) -> int | None:
    value = ds.get("SeriesNumber")
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _slice_geometry(ds: Dataset, label: str) -> tuple[list[_Slice] | None, str]:
    """Slices of an image instance, or the reason it has no 3D geometry."""
    if "Rows" not in ds or "Columns" not in ds:
        return None, f"{label}: not an image (no Rows/Columns)"
    try:
        return _instance_slices(ds, 0, label), ""
    except InputRejected as exc:
        return None, str(exc)


def _thickness(ds: Dataset) -> Dataset:
    holder = Dataset()
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        if keyword in ds:
            holder[keyword] = ds[keyword]
    return holder


def _scan_dicom(path: Path, label: str, size: int, tenant_id: str) -> ScannedFile | None:
    ds = _read_dicom(path, label)
    media_class = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")
    if media_class == _DICOMDIR_SOP_CLASS or _str(ds, "SOPClassUID") == _DICOMDIR_SOP_CLASS:
        return None
    _check_pixels(ds, size, label)
    sha = file_sha256(path)
    pkey = patient_key(tenant_id, _str(ds, "PatientID"), _str(ds, "PatientName"))
    derived: set[str] = set()
    study_uid = _uid(ds, "StudyInstanceUID", label)
    frame = _str(ds, "FrameOfReferenceUID")
    if not study_uid:
        study_fields = ("StudyDate", "StudyTime", "AccessionNumber", "StudyID")
        study_uid = derive_uid("study", pkey, frame, *(_str(ds, k) for k in study_fields))
        derived.add("study")
    series_uid = _uid(ds, "SeriesInstanceUID", label)
    if not series_uid:
        fields = ("Modality", "SeriesNumber", "SeriesDate", "SeriesTime", "SeriesDescription")
        series_uid = derive_uid("series", study_uid, frame, *(_str(ds, k) for k in fields))
        derived.add("series")
    sop_uid = _sop_uid(ds, label)
    if not sop_uid:
        sop_uid = derive_uid("instance", sha)
        derived.add("instance")
    slices, error = _slice_geometry(ds, label)
    return ScannedFile(
        path=path,
        label=label,
        kind="dicom",
        size=size,
        sha256=sha,
        sop_instance_uid=sop_uid,
        study_uid=study_uid,
        series_uid=series_uid,
        derived=derived,
        patient_key=pkey,
        modality=_str(ds, "Modality")[:16] or "OT",
        description=_str(ds, "SeriesDescription")[:64],
        body_part=_str(ds, "BodyPartExamined")[:64],
        study_date=_str(ds, "StudyDate")[:8],
        series_number=_series_number(ds),
        slices=slices,
        geometry_error=error,
        slice_thickness=_thickness(ds),
    )


# -- NIfTI -------------------------------------------------------------------------------------


def _nifti_header(path: Path) -> tuple[Any, bool] | None:
    """The NIfTI-1/2 header of a (possibly gzip-compressed) file, or ``None`` if it is not one.

    Reads at most :data:`NIFTI_HEAD_BYTES` (header and extensions).
    """
    with path.open("rb") as handle:
        gz = handle.read(2) == b"\x1f\x8b"
    head = b""
    try:
        with gzip.open(path, "rb") if gz else path.open("rb") as handle:
            while len(head) < NIFTI_HEAD_BYTES and (chunk := handle.read(64 * 1024)):
                head += chunk
    except (OSError, EOFError, zlib.error):
        pass  # a truncated file: judge the bytes read so far, refused as truncated later
    for klass, size, magic_at, magics in (
        (nib.Nifti1Header, 348, 344, (b"n+1\x00", b"ni1\x00")),
        (nib.Nifti2Header, 540, 4, (b"n+2\x00", b"ni2\x00")),
    ):
        if len(head) < size or head[magic_at : magic_at + 4] not in magics:
            continue
        if size not in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")):
            continue
        for data in (head, head[:size]):  # with extensions, else the bare header
            try:
                return klass.from_fileobj(io.BytesIO(data)), gz  # extensions need tell()
            except Exception:  # nibabel raises several types on invalid headers
                continue
    return None


def _check_nifti_complete(path: Path, header: Any, gz: bool, label: str) -> None:
    """Refuse a NIfTI file shorter than its header says (a ``.gz`` is decompressed in chunks)."""
    shape = tuple(int(n) for n in header.get_data_shape())
    offset = max(int(header.get_data_offset()), int(header["sizeof_hdr"]) + 4)
    needed = offset + int(np.prod(shape)) * header.get_data_dtype().itemsize
    if not gz:
        have = path.stat().st_size
    else:
        have = 0
        try:
            with gzip.open(path, "rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    have += len(chunk)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputRejected(f"{label}: truncated or corrupt gzip-compressed NIfTI") from exc
    if have < needed:
        raise InputRejected(f"{label}: truncated NIfTI file ({have} of {needed} bytes)")


def nifti_geometry_summary(header: Any, label: str) -> dict[str, Any]:
    """Geometry summary (``shape`` [k, j, i], spacing, LPS affine) of a NIfTI header."""
    shape_ijk = tuple(int(n) for n in header.get_data_shape())
    if len(shape_ijk) == 4 and shape_ijk[3] == 1:
        shape_ijk = shape_ijk[:3]
    if len(shape_ijk) != 3:
        raise InputRejected(f"{label}: expected a 3D NIfTI image, got shape {shape_ijk}")
    affine_ras = _ras_affine(types.SimpleNamespace(header=header), Path(label))
    _, affine = from_ijk_order(np.zeros((1, 1, 1)), ras_to_lps(affine_ras))
    return geometry_summary(shape_ijk[::-1], affine, frame_of_reference_uid="")


def _scan_nifti(path: Path, label: str, size: int, header: Any, gz: bool) -> ScannedFile:
    geometry = nifti_geometry_summary(header, label)
    _check_nifti_complete(path, header, gz, label)
    sha = file_sha256(path)
    modality = _extension_fields(types.SimpleNamespace(header=header)).get("modality", "")
    name = Path(label).name
    return ScannedFile(
        path=path,
        label=label,
        kind="nifti",
        size=size,
        sha256=sha,
        sop_instance_uid=derive_uid("nifti-instance", sha),
        study_uid=derive_uid("nifti-study", sha),
        series_uid=derive_uid("nifti-series", sha),
        derived={"study", "series", "instance"},
        modality=modality[:16],
        description=name[:64],
        nifti_geometry=geometry,
        nifti_gzip=gz,
    )
