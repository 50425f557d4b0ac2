"""NRRD / MetaImage (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) -> :class:`~models.volume.Volume`.

SimpleITK works in **LPS** physical space with index order ``(i, j, k)``: position =
``origin + direction @ (spacing * (i, j, k))``. :func:`sitk.GetArrayFromImage` already returns the
array indexed ``[k, j, i]``; only the affine is reordered, with
:func:`~models.volume.from_ijk_order`. (SimpleITK converts NRRD files declared in RAS space to LPS
when reading.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813

from models.errors import InputRejected
from models.volume import Volume, from_ijk_order


def _read(path: Path) -> sitk.Image:
    """Read with SimpleITK, refusing unreadable files."""
    if not path.is_file():
        raise InputRejected(f"{path}: no such file")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise InputRejected(f"{path}: not a readable NRRD/MetaImage file ({first_line})") from exc


def _affine_ijk(image: sitk.Image, path: Path) -> npt.NDArray[np.float64]:
    """4x4 affine, index ``(i, j, k, 1)`` -> LPS mm."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = origin
    if not np.all(np.isfinite(affine)):
        raise InputRejected(f"{path}: geometry contains NaN or infinity")
    if abs(float(np.linalg.det(affine[:3, :3]))) < 1e-6:
        raise InputRejected(f"{path}: singular geometry (zero spacing or degenerate direction)")
    return affine


def read_itk_image(path: Path, modality: str = "OT", units: str = "") -> Volume:
    """Read a 3D scalar NRRD or MetaImage file as a Volume.

    Args:
        path: ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` file.
        modality: Modality to record (the formats do not carry one).
        units: Intensity units to record (``"HU"`` only when the caller knows it).

    Returns:
        Volume with ``array`` shape ``(n_k, n_j, n_i)`` in the stored dtype and the LPS affine.

    Raises:
        InputRejected: Unreadable file, not 3D, vector/multi-component pixels, or singular
            or non-finite geometry.
    """
    path = Path(path)
    image = _read(path)
    if image.GetDimension() != 3:
        raise InputRejected(f"{path}: expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputRejected(
            f"{path}: {image.GetNumberOfComponentsPerPixel()} components per voxel; only scalar "
            "images are supported"
        )
    array_kji = sitk.GetArrayFromImage(image)
    # GetArrayFromImage is already [k, j, i]; hand from_ijk_order the (i, j, k) view of it.
    array, affine = from_ijk_order(array_kji.transpose(2, 1, 0), _affine_ijk(image, path))
    return Volume(
        array=array,
        affine=affine,
        modality=modality,
        units=units,
        meta={"source_format": "itk"},
    )
