"""DICOM pixel data: decoding (compressed transfer syntaxes included) and the rescaled stack.

:func:`decode_frames` returns the stored values of one instance; :func:`_stack_pixels` applies
the per-slice rescale and stacks the slices in ``k`` order, shape ``(n_slices, rows, columns)``.

Every unusable input raises :class:`~models.errors.InputRejected` with a message that names the
file and the problem, never a patient identifier.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from models.errors import InputRejected
from service.io.dicom_geometry import _Slice


def decode_frames(ds: Dataset, label: str) -> npt.NDArray[Any]:
    """Decode the stored pixel values of an instance (no rescale applied).

    Compressed transfer syntaxes (JPEG 2000, JPEG-LS, JPEG lossless, RLE, deflate...) are decoded
    by pydicom's pixel handlers with the pylibjpeg plugins.

    Args:
        ds: A fully read dataset (with PixelData).
        label: File name used in error messages.

    Returns:
        Stored values, shape ``(n_frames, rows, columns)``, native byte order.

    Raises:
        InputRejected: Missing, truncated or undecodable pixel data.
    """
    if "PixelData" not in ds:
        raise InputRejected(f"{label}: pixel data missing or truncated")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise many exception types on corrupt data
        raise InputRejected(
            f"{label}: corrupt or truncated pixel data ({type(exc).__name__}: {exc})"
        ) from exc
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = (n_frames, int(ds.Rows), int(ds.Columns))
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.shape != expected:
        raise InputRejected(f"{label}: decoded pixel shape {array.shape}, expected {expected}")
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _output_dtype(slices: list[_Slice], raw_dtype: np.dtype[Any], modality: str) -> np.dtype[Any]:
    """float32 for CT or any real rescale; the stored integer type when values are unchanged."""
    identity = all(s.slope == 1.0 and s.intercept == 0.0 for s in slices)
    if modality != "CT" and identity:
        return raw_dtype
    return np.dtype(np.float32)


def _stack_pixels(
    ordered: list[_Slice], datasets: list[Dataset], labels: list[str], modality: str
) -> npt.NDArray[Any]:
    """Decode each instance once and stack the rescaled slices in ``k`` order."""
    decoded: dict[int, npt.NDArray[Any]] = {}
    for s in ordered:
        if s.dataset_index not in decoded:
            idx = s.dataset_index
            decoded[idx] = decode_frames(datasets[idx], labels[idx])
    raw_dtype = np.result_type(*[a.dtype for a in decoded.values()])
    dtype = _output_dtype(ordered, raw_dtype, modality)
    out = np.empty((len(ordered), ordered[0].rows, ordered[0].columns), dtype=dtype)
    for k, s in enumerate(ordered):
        raw = decoded[s.dataset_index][s.frame]
        if dtype == raw_dtype:
            out[k] = raw
        else:
            out[k] = raw.astype(np.float64) * s.slope + s.intercept
    return out
