"""NIfTI-1 (``.nii``/``.nii.gz``) <-> :class:`~models.volume.Volume` with nibabel.

NIfTI stores the array in ``(i, j, k)`` index order and its affine maps that index to **RAS** mm.
The conversions to the project's ``(k, j, i)`` / LPS convention use only
:func:`~models.volume.from_ijk_order`, :func:`~models.volume.to_ijk_order`,
:func:`~models.volume.ras_to_lps` and :func:`~models.volume.lps_to_ras`.

Reading prefers the sform (when ``sform_code > 0``), then the qform (``qform_code > 0``); a file
with neither has no orientation and is refused.

Writing: integer and boolean arrays keep their integer type (bool as uint8). A float array with
``units == "HU"`` whose values are all integral and fit in int16 is written as **int16** (lossless,
half the size); every other float array is written as float32 (float64 stays float64). No scaling
(``scl_slope``/``scl_inter``) is used, so the stored values are the values. ``sform_code`` and
``qform_code`` are 1 (scanner anatomical); a sheared affine (gantry tilt) cannot be a qform, so
then ``qform_code`` is 0 and the exact geometry is in the sform. Spatial units are mm. Modality,
units and the frame of reference UID travel in a small JSON comment extension so that a
Volume -> NIfTI -> Volume round trip is complete; files without it read as ``modality="OT"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from models.errors import InputRejected
from models.volume import Volume, from_ijk_order, lps_to_ras, ras_to_lps, to_ijk_order

from .atomic import atomic_file

_EXTENSION_KEY = "voxelgate"
_COMMENT_CODE = 6
_INT16_MIN, _INT16_MAX = -32768, 32767


def _load(path: Path) -> Any:
    """Load the image header and lazy data, refusing unreadable files."""
    try:
        return nib.load(str(path))
    except FileNotFoundError as exc:
        raise InputRejected(f"{path}: no such file") from exc
    except Exception as exc:  # nibabel raises several types on corrupt files
        raise InputRejected(f"{path}: not a readable NIfTI file ({exc})") from exc


def _ras_affine(img: Any, path: Path) -> npt.NDArray[np.float64]:
    """Index ``(i, j, k)`` -> RAS affine: sform if coded, else qform if coded."""
    sform, sform_code = img.header.get_sform(coded=True)
    if sform is not None and int(sform_code) > 0:
        affine = np.asarray(sform, dtype=np.float64)
    else:
        qform, qform_code = img.header.get_qform(coded=True)
        if qform is None or int(qform_code) <= 0:
            raise InputRejected(f"{path}: no orientation (sform_code and qform_code are both 0)")
        affine = np.asarray(qform, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputRejected(f"{path}: affine contains NaN or infinity")
    if abs(float(np.linalg.det(affine[:3, :3]))) < 1e-6:
        raise InputRejected(f"{path}: singular affine (zero or degenerate voxel spacing)")
    return affine


def _has_scaling(img: Any) -> bool:
    """True when the header's scl_slope/scl_inter change the stored values."""
    slope, inter = img.header.get_slope_inter()
    return not ((slope is None or slope == 1.0) and (inter is None or inter == 0.0))


def _data_ijk(img: Any, path: Path) -> npt.NDArray[Any]:
    """Voxel values in ``(i, j, k)`` order: stored dtype when unscaled, else float32."""
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputRejected(f"{path}: expected a 3D image, got shape {tuple(img.shape)}")
    try:
        if _has_scaling(img):
            data = np.asarray(img.get_fdata(dtype=np.float32))
        else:
            data = np.asarray(img.dataobj)
    except Exception as exc:  # truncated gzip, short file...
        raise InputRejected(f"{path}: cannot read voxel data ({exc})") from exc
    data = data.reshape(shape)
    return data.astype(data.dtype.newbyteorder("="), copy=False)


def _extension_fields(img: Any) -> dict[str, str]:
    """Modality/units/frame of reference from our JSON comment extension, if present."""
    for ext in img.header.extensions:
        if ext.get_code() != _COMMENT_CODE:
            continue
        try:
            payload = json.loads(ext.get_content())
        except (ValueError, TypeError, UnicodeDecodeError):
            continue
        fields = payload.get(_EXTENSION_KEY) if isinstance(payload, dict) else None
        if isinstance(fields, dict):
            return {str(k): str(v) for k, v in fields.items()}
    return {}


def read_nifti(path: Path) -> Volume:
    """Read a NIfTI-1 file as a Volume.

    Args:
        path: ``.nii`` or ``.nii.gz`` file; 3D, or 4D with a single volume (squeezed).

    Returns:
        Volume with ``array`` shape ``(n_k, n_j, n_i)`` = NIfTI ``(nz, ny, nx)`` and the affine
        converted from RAS ``(i, j, k)`` to LPS ``(k, j, i)``. Integer data without scaling keeps
        its dtype; scaled data is float32, and so is data marked ``units="HU"`` by our extension
        (as the DICOM reader gives CT).

    Raises:
        InputRejected: Unreadable file, not 3D, no sform/qform, singular or non-finite affine.
    """
    path = Path(path)
    img = _load(path)
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputRejected(f"{path}: not a NIfTI image ({type(img).__name__})")
    affine_lps_ijk = ras_to_lps(_ras_affine(img, path))
    array, affine = from_ijk_order(_data_ijk(img, path), affine_lps_ijk)
    fields = _extension_fields(img)
    if fields.get("units") == "HU":
        array = array.astype(np.float32, copy=False)
    return Volume(
        array=array,
        affine=affine,
        modality=fields.get("modality", "OT"),
        units=fields.get("units", ""),
        frame_of_reference_uid=fields.get("frame_of_reference_uid", ""),
        meta={"source_format": "nifti"},
    )


def _storage_array(volume: Volume) -> npt.NDArray[Any]:
    """The array to store (see the module docstring for the dtype rules)."""
    array = volume.array
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise InputRejected(f"cannot write a {array.dtype} volume to NIfTI")
    if volume.units == "HU" and array.size and np.all(np.isfinite(array)):
        lo, hi = float(array.min()), float(array.max())
        if lo >= _INT16_MIN and hi <= _INT16_MAX and np.array_equal(array, np.round(array)):
            return array.astype(np.int16)
    if array.dtype == np.float64:
        return array
    return array.astype(np.float32)


def _is_orthogonal(affine: npt.NDArray[np.float64]) -> bool:
    """True when the three axis columns are mutually orthogonal (no shear)."""
    m = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return bool(np.allclose(m.T @ m, np.eye(3), atol=1e-6))


def _extension(volume: Volume) -> Any:
    """JSON comment extension carrying modality, units and frame of reference UID."""
    payload = {
        _EXTENSION_KEY: {
            "modality": volume.modality,
            "units": volume.units,
            "frame_of_reference_uid": volume.frame_of_reference_uid,
        }
    }
    return nib.nifti1.Nifti1Extension(_COMMENT_CODE, json.dumps(payload).encode())


def write_nifti(volume: Volume, path: Path) -> None:
    """Write a Volume as NIfTI-1 (gzip-compressed when the name ends in ``.gz``), atomically.

    Args:
        volume: The volume; ``array[k, j, i]`` and LPS affine.
        path: Destination ``.nii`` or ``.nii.gz``.

    Raises:
        InputRejected: The array type cannot be stored.
    """
    path = Path(path)
    data_ijk, affine_ijk = to_ijk_order(_storage_array(volume), volume.affine)
    affine_ras = lps_to_ras(affine_ijk)
    img = nib.Nifti1Image(data_ijk, affine=None)
    header = img.header
    header.set_data_dtype(data_ijk.dtype)
    img.set_sform(affine_ras, code=1)
    if _is_orthogonal(affine_ras):
        img.set_qform(affine_ras, code=1)
    else:
        img.set_qform(None, code=0)
    header.set_xyzt_units(xyz="mm", t="sec")
    header.set_slope_inter(1.0, 0.0)
    header.extensions.append(_extension(volume))
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    with atomic_file(path) as tmp:
        tmp_named = tmp.with_name(tmp.name + suffix)
        try:
            nib.save(img, str(tmp_named))
            tmp_named.replace(tmp)
        finally:
            if tmp_named.exists():
                tmp_named.unlink()
