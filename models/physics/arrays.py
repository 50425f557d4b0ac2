"""Shape and value checks of projector inputs: images and sinograms, single or batched.

Shapes follow :mod:`models.physics.projector`: an image is ``(N, N)`` or ``(B, N, N)``
(``[row (+y), col (+x)]``, 1/mm) and a sinogram ``(n_views, n_det)`` or ``(B, n_views, n_det)``
(``[view, bin]``, line integrals). Both are returned as C-contiguous batches with a flag telling
whether the input had a batch axis, so results can be given back in the caller's form.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from models.errors import InputRejected

FloatArray = npt.NDArray[np.floating[Any]]
"""A numpy float array (float32 unless a projector was built for float64)."""


class _Shapes(Protocol):
    """What the checks need of a geometry (parallel or fan beam)."""

    @property
    def image_shape(self) -> tuple[int, int]: ...

    @property
    def sinogram_shape(self) -> tuple[int, int]: ...


def _as_batch(
    array: npt.ArrayLike, trailing: tuple[int, int], name: str, dtype: npt.DTypeLike
) -> tuple[FloatArray, bool]:
    """Return ``array`` as a C-contiguous ``(B, *trailing)`` array and whether it was batched."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "fiu":
        raise InputRejected(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim == 2:
        batched = False
        arr = arr[None]
    elif arr.ndim == 3:
        batched = True
    else:
        raise InputRejected(
            f"{name} must have shape {trailing} or (B, *{trailing}), got {arr.shape}"
        )
    if arr.shape[1:] != trailing or arr.shape[0] < 1:
        raise InputRejected(
            f"{name} must have shape {trailing} or (B, *{trailing}), got {arr.shape}"
        )
    out = np.ascontiguousarray(arr, dtype=dtype)
    if not np.all(np.isfinite(out)):
        raise InputRejected(f"{name} contains NaN or infinity")
    return out, batched


def as_image_batch(
    image: npt.ArrayLike, geometry: _Shapes, dtype: npt.DTypeLike = np.float32
) -> tuple[FloatArray, bool]:
    """Validate an image or image batch against a geometry.

    Args:
        image: Shape ``(N, N)`` or ``(B, N, N)``, finite real values.
        geometry: The scan geometry (gives N).
        dtype: Float dtype of the returned array.

    Returns:
        ``(batch, batched)``: a C-contiguous ``(B, N, N)`` array and whether the input had a
        batch axis.

    Raises:
        InputRejected: Wrong shape, non-real dtype or non-finite values.
    """
    return _as_batch(image, geometry.image_shape, "image", dtype)


def as_sinogram_batch(
    sinogram: npt.ArrayLike, geometry: _Shapes, dtype: npt.DTypeLike = np.float32
) -> tuple[FloatArray, bool]:
    """Validate a sinogram or sinogram batch against a geometry.

    Args:
        sinogram: Shape ``(n_views, n_det)`` or ``(B, n_views, n_det)``, finite real values.
        geometry: The scan geometry.
        dtype: Float dtype of the returned array.

    Returns:
        ``(batch, batched)``: a C-contiguous ``(B, n_views, n_det)`` array and whether the
        input had a batch axis.

    Raises:
        InputRejected: Wrong shape, non-real dtype or non-finite values.
    """
    return _as_batch(sinogram, geometry.sinogram_shape, "sinogram", dtype)
