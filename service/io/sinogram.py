"""Read projection data: a sinogram file (NumPy, TIFF, NIfTI) with its geometry JSON.

A sinogram input is a *bundle*: a JSON file with ``"format": "voxelgate-sinogram/1"`` (schema:
:class:`models.sinogram.SinogramSpec`) naming a data file beside it. The input path may be the
JSON itself or a folder holding exactly one such JSON. The data's shape is read from its header
first and checked against the limits and the JSON before the values are loaded; the values are
then normalised by :func:`models.sinogram.normalise_projections`.

Array axes as read: ``.npy`` as saved (C order); TIFF as ``tifffile`` gives it (pages first,
then rows, columns); NIfTI as nibabel's ``dataobj`` gives it (i, j, k). The JSON's ``axes`` names
those axes in that order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from models.errors import InputRejected
from models.sinogram import (
    MAX_SINOGRAM_VALUES,
    SINOGRAM_FORMAT,
    Sinogram,
    SinogramSpec,
    normalise_projections,
)

MAX_JSON_BYTES = 64 * 1024
"""Largest geometry JSON read."""

DATA_SUFFIXES = (".npy", ".tif", ".tiff", ".nii", ".nii.gz")
"""Accepted data files."""


def is_bundle_json(path: Path) -> bool:
    """Whether ``path`` is a (small) JSON file whose ``format`` is the sinogram format."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    if path.stat().st_size > MAX_JSON_BYTES:
        return False
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(content, dict) and content.get("format") == SINOGRAM_FORMAT


def find_bundle_json(path: Path) -> Path | None:
    """The geometry JSON of a sinogram bundle at ``path``, or ``None`` if it is not one.

    Args:
        path: A ``.json`` file, or a folder (its top level is searched).

    Raises:
        InputRejected: A folder holding more than one geometry JSON.
    """
    path = Path(path)
    if path.is_file():
        return path if is_bundle_json(path) else None
    if not path.is_dir():
        return None
    found = sorted(p for p in path.glob("*.json") if is_bundle_json(p))
    if len(found) > 1:
        raise InputRejected(
            f"{len(found)} sinogram geometry JSON files in one folder "
            f"({', '.join(p.name for p in found[:4])}); give one per input"
        )
    return found[0] if found else None


def read_spec(json_path: Path) -> SinogramSpec:
    """Parse and validate a geometry JSON.

    Raises:
        InputRejected: Unreadable JSON or one that breaks the schema (the message names the
            fields).
    """
    try:
        content = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputRejected(f"{Path(json_path).name}: not readable JSON ({exc})") from exc
    try:
        return SinogramSpec.model_validate(content)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'json'}: {e['msg']}" for e in exc.errors()
        )
        raise InputRejected(f"{Path(json_path).name}: {problems}") from exc


def _shape_of(path: Path) -> tuple[int, ...]:
    name = path.name.lower()
    try:
        if name.endswith(".npy"):
            return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
        if name.endswith((".tif", ".tiff")):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return tuple(tif.series[0].shape)
        import nibabel as nib

        image: Any = nib.load(path)
        return tuple(int(n) for n in image.shape)
    except InputRejected:
        raise
    except Exception as exc:  # any reader failure is a bad file, not a server error
        raise InputRejected(f"{path.name}: not a readable {path.suffix} file ({exc})") from exc


def _values_of(path: Path) -> np.ndarray:
    name = path.name.lower()
    try:
        if name.endswith(".npy"):
            return np.load(path, allow_pickle=False)
        if name.endswith((".tif", ".tiff")):
            import tifffile

            return np.asarray(tifffile.imread(path))
        import nibabel as nib

        image: Any = nib.load(path)
        return np.asarray(image.dataobj)
    except Exception as exc:  # truncated or corrupt data
        raise InputRejected(f"{path.name}: cannot read the values ({exc})") from exc


def check_data_file(data_path: Path, spec: SinogramSpec) -> tuple[int, ...]:
    """Check a data file against the limits and its JSON from the header alone.

    Returns:
        The data's shape.

    Raises:
        InputRejected: Unsupported suffix, unreadable header, more than
            :data:`~models.sinogram.MAX_SINOGRAM_VALUES` values, or a number of axes or
            sizes other than the JSON's.
    """
    if not data_path.name.lower().endswith(DATA_SUFFIXES):
        raise InputRejected(f"data {spec.data!r}: accepted files are {', '.join(DATA_SUFFIXES)}")
    shape = _shape_of(data_path)
    if int(np.prod(shape, dtype=np.int64)) > MAX_SINOGRAM_VALUES:
        raise InputRejected(f"{spec.data}: {shape} exceeds {MAX_SINOGRAM_VALUES} values")
    if len(shape) != len(spec.axes):
        raise InputRejected(
            f"{spec.data} has shape {shape} ({len(shape)} axes) but the JSON's axes are "
            f"{list(spec.axes)}"
        )
    sizes = dict(zip(spec.axes, shape, strict=True))
    if spec.views is not None and sizes["views"] != spec.views:
        raise InputRejected(
            f"the JSON says views={spec.views} but {spec.data} has {sizes['views']} views"
        )
    if spec.detectors is not None and sizes["detectors"] != spec.detectors:
        raise InputRejected(
            f"the JSON says detectors={spec.detectors} but {spec.data} has "
            f"{sizes['detectors']} bins"
        )
    return shape


def read_sinogram(path: Path) -> Sinogram:
    """Read a sinogram bundle (see the module docstring).

    Args:
        path: The geometry JSON or a folder holding it.

    Returns:
        The normalised :class:`~models.sinogram.Sinogram` (line integrals, conventions of
        :mod:`models.physics`), ``meta["source_file"]`` the data file's name.

    Raises:
        InputRejected: No bundle there, a missing or unsupported data file, a shape beyond the
            limits or unlike the JSON's, and every check of
            :func:`models.sinogram.normalise_projections`.
    """
    json_path = find_bundle_json(Path(path))
    if json_path is None:
        raise InputRejected(f"{Path(path).name}: no {SINOGRAM_FORMAT} geometry JSON there")
    spec = read_spec(json_path)
    data_path = json_path.parent / spec.data
    if not data_path.is_file():
        raise InputRejected(f"data file {spec.data!r} named by {json_path.name} is missing")
    check_data_file(data_path, spec)
    sinogram = normalise_projections(_values_of(data_path), spec)
    sinogram.meta["source_file"] = data_path.name
    return sinogram
