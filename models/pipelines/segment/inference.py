"""Intensity handling, body cropping, sliding-window inference, label postprocessing.

Torch and scipy. The sliding window is streamed (:mod:`models.pipelines.segment.sliding`): no
full-volume logits buffer is ever held.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy import ndimage

from models.errors import InputRejected
from models.pipelines.segment.card import Intensity
from models.pipelines.segment.sliding import sliding_window_classes

MIN_WINDOW_FRACTION = 0.25
"""A volume is padded up to the window when smaller; it is refused when, on the network grid,
any axis is shorter than this fraction of the window (the network would see mostly padding)."""


NORMALISE_CHUNK_VOXELS = 1 << 22
"""Voxels per chunk of :func:`normalise` (4 Mi voxels = 16 MB of float32 temporaries)."""


def _chunks(n_rows: int, row_voxels: int) -> list[tuple[int, int]]:
    """Row ranges along axis 0 of about :data:`NORMALISE_CHUNK_VOXELS` voxels each."""
    step = max(1, NORMALISE_CHUNK_VOXELS // max(1, row_voxels))
    return [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def normalise(
    array: npt.NDArray[Any],
    intensity: Intensity,
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """Apply the card's intensity handling, in chunks along axis 0 (no full-size temporary).

    Args:
        array: Image in its units (HU for CT), any 3D shape, any dtype and strides (a
            transposed or flipped view is read as it is, never copied whole).
        intensity: ``window``: clip to ``[lower, upper]`` and scale to ``[0, 1]``; ``zscore``:
            ``(x - mean) / std`` with the card's values, else the array's own (computed in
            float64).
        out: Optional C-contiguous float32 array of ``array``'s shape to write into.

    Returns:
        C-contiguous float32 array, same shape (``out`` when given). Same float32 arithmetic as
        one whole-array expression, so the values do not depend on the chunking.
    """
    shape = array.shape
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 array of the input's shape")
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    chunks = _chunks(shape[0], row) if shape else [(0, 0)]
    if intensity.kind == "window":
        lo, hi = float(intensity.lower or 0.0), float(intensity.upper or 1.0)
        for a, b in chunks:
            part = out[a:b]
            np.clip(np.asarray(array[a:b], dtype=np.float32), lo, hi, out=part)
            part -= lo
            part /= hi - lo
        return out
    mean, std = intensity.mean, intensity.std
    if mean is None or std is None:
        total = sum(float(np.sum(array[a:b], dtype=np.float64)) for a, b in chunks)
        mean = total / max(1, array.size)
        squares = sum(
            float(np.sum((np.asarray(array[a:b], dtype=np.float64) - mean) ** 2)) for a, b in chunks
        )
        std = (squares / max(1, array.size)) ** 0.5
    scale = max(float(std), 1e-6)
    for a, b in chunks:
        part = out[a:b]
        np.subtract(np.asarray(array[a:b], dtype=np.float32), float(mean), out=part)
        part /= scale
    return out


def resample_image(
    array: npt.NDArray[np.float32], shape: tuple[int, int, int], device: str
) -> torch.Tensor:
    """Trilinear resampling (voxel edges aligned) of a canonical image to the network grid.

    Args:
        array: float32, canonical shape ``(n0, n1, n2)``.
        shape: Network grid shape ``(n'0, n'1, n'2)``.
        device: Torch device.

    Returns:
        Tensor ``(1, 1, n'0, n'1, n'2)`` float32 on ``device``.
    """
    x = torch.from_numpy(np.ascontiguousarray(array)).to(device)[None, None]
    if tuple(x.shape[2:]) == shape:
        return x
    return F.interpolate(x, size=shape, mode="trilinear", align_corners=False)


def check_extent(shape: tuple[int, ...], patch: tuple[int, int, int]) -> bool:
    """Whether the network grid needs padding to the window; refuse far too small volumes.

    Returns:
        ``True`` when some axis is shorter than the window (MONAI then pads it).

    Raises:
        InputRejected: An axis shorter than :data:`MIN_WINDOW_FRACTION` of the window.
    """
    small = [t for t in range(3) if shape[t] < max(1, round(MIN_WINDOW_FRACTION * patch[t]))]
    if small:
        raise InputRejected(
            f"volume too small for the model's window: {list(shape)} voxels at the model's "
            f"spacing against a {list(patch)} window (each axis needs at least "
            f"{MIN_WINDOW_FRACTION:.0%} of the window; smaller volumes are padded)"
        )
    return any(shape[t] < patch[t] for t in range(3))


def _precision(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on CPU, or on CUDA devices that support it; else nothing (fp32)."""
    if not bf16:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def predict_classes(
    image: torch.Tensor,
    network: torch.nn.Module,
    patch: tuple[int, int, int],
    *,
    overlap: float,
    sw_batch: int,
    bf16: bool,
    axis: int | None = None,
) -> npt.NDArray[np.unsignedinteger[Any]]:
    """Streamed sliding-window inference with Gaussian blending, then argmax.

    The windows, padding and weights are MONAI's ``sliding_window_inference`` (mode
    ``gaussian``, padding constant = the image minimum, i.e. air for CT windows), but the
    blended logits live only in a slab one window long along the streamed axis
    (:func:`~models.pipelines.segment.sliding.sliding_window_classes`). In fp32 the result
    equals the argmax of MONAI's full-volume output (up to float near-ties); with bf16 the
    bfloat16 logits are blended in float32 (MONAI would weight them in bfloat16).

    Args:
        image: ``(1, 1, D0, D1, D2)`` normalised image on the network grid.
        network: Maps ``(B, 1, p0, p1, p2)`` to logits ``(B, C, p0, p1, p2)``.
        patch: Window size (voxels).
        overlap: Fraction of overlap between windows.
        sw_batch: Windows per network call.
        bf16: Run the network under bfloat16 autocast (CPU, or CUDA with bf16 support; other
            CUDA devices run fp32). Logits are blended in float32 either way.
        axis: Streamed axis; default the longest.

    Returns:
        Class indices ``(D0, D1, D2)``: ``uint8`` for at most 256 classes, else ``uint16``
        (class ``c`` = label value ``c``; 0 background).
    """
    with torch.inference_mode(), _precision(image.device, bf16):
        classes, _ = sliding_window_classes(
            image,
            network,
            patch,
            overlap=overlap,
            sw_batch=sw_batch,
            mode="gaussian",
            cval=float(image.min()),
            axis=axis,
        )
    return classes


Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
"""A box of voxels: ``(start, stop)`` per array axis (stop exclusive)."""

BODY_HU = -500.0
"""CT voxels above this (HU) are body (or table, or other objects in the field of view)."""

BODY_GRID_MM = 4.0
"""The body mask is found on every n-th voxel, n = floor(this / spacing) per axis (>= 1)."""

BODY_MIN_ML = 10.0
"""Connected pieces of the opened mask smaller than this (mL) are dropped (the largest piece is
always kept)."""

BODY_MARGIN_MM = 10.0
"""Margin added around the body's bounding box on every side (mm); it also covers the
subsampling and what the opening trims off thin protrusions."""


def body_box(hu: npt.NDArray[Any], spacing_mm: tuple[float, float, float]) -> Box | None:
    """Bounding box of the body in a CT volume, with a margin.

    The mask ``hu > BODY_HU`` is taken on a subsampled grid (:data:`BODY_GRID_MM`), opened once
    (6-connected; the volume's faces do not erode it, so a body cut by the field of view stays),
    pieces under :data:`BODY_MIN_ML` are dropped, and the box of the rest is widened by the
    subsampling step and :data:`BODY_MARGIN_MM`, clipped to the volume.

    Args:
        hu: CT in HU, any 3D shape and strides (e.g. the canonical view of the source).
        spacing_mm: Voxel spacing along the array's axes, mm.

    Returns:
        The box in ``hu``'s voxel indices, or ``None`` when no voxel is above the threshold.
    """
    steps = [max(1, int(BODY_GRID_MM / s)) for s in spacing_mm]
    sub = np.asarray(hu[:: steps[0], :: steps[1], :: steps[2]]) > BODY_HU
    if not sub.any():
        return None
    opened = ndimage.binary_dilation(ndimage.binary_erosion(sub, border_value=1)) & sub
    mask = opened if opened.any() else sub
    pieces, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    voxel_ml = float(np.prod([st * sp for st, sp in zip(steps, spacing_mm, strict=True)])) / 1e3
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)[1:] * voxel_ml
    keep = np.concatenate([[False], sizes >= min(BODY_MIN_ML, float(sizes.max()))])
    mask = keep[pieces]
    box = []
    for t in range(3):
        other = tuple(a for a in range(3) if a != t)
        hit = np.flatnonzero(mask.any(axis=other))
        margin = math.ceil(BODY_MARGIN_MM / spacing_mm[t])
        start = int(hit[0]) * steps[t] - (steps[t] - 1) - margin
        stop = (int(hit[-1]) + 1) * steps[t] + margin
        box.append((max(0, start), min(hu.shape[t], stop)))
    return (box[0], box[1], box[2])


def network_box(
    box: Box,
    shape: tuple[int, int, int],
    net_shape: tuple[int, int, int],
    patch: tuple[int, int, int],
) -> Box:
    """The network-grid voxels that the canonical voxels of ``box`` take their labels from.

    Uses the mapping of :func:`~models.pipelines.segment.geometry.nearest_back` (canonical
    voxel ``p`` reads network voxel ``floor((p + 0.5) * n' / n)``), so inference inside the
    returned box labels every canonical voxel of ``box`` exactly as on the whole grid would
    (up to what the network sees); the box is widened to the window where the grid allows.

    Args:
        box: Canonical voxel box.
        shape: Canonical shape ``(n0, n1, n2)``.
        net_shape: Network grid shape ``(n'0, n'1, n'2)``.
        patch: Window (network voxels).

    Returns:
        Network voxel box.
    """
    out = []
    for (a0, a1), n, m, p in zip(box, shape, net_shape, patch, strict=True):
        ends = np.minimum(((np.array([a0, a1 - 1]) + 0.5) * (m / n)).astype(np.int64), m - 1)
        lo, hi = int(ends[0]), int(ends[1]) + 1
        width = min(p, m)
        if hi - lo < width:  # widen to the window (centred), inside the grid
            lo = max(0, min(lo - (width - (hi - lo)) // 2, m - width))
            hi = lo + width
        out.append((lo, hi))
    return (out[0], out[1], out[2])


def largest_component(labels: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.integer[Any]]:
    """Keep the largest 26-connected component of every label value (others -> 0), in place."""
    structure = np.ones((3, 3, 3), dtype=bool)
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        comp, n = ndimage.label(mask, structure=structure)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            labels[mask & (comp != int(sizes.argmax()))] = 0
    return labels


def fill_holes(labels: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.integer[Any]]:
    """Fill background voxels enclosed by one label (3D) with that label, in place."""
    for value in np.unique(labels):
        if value == 0:
            continue
        filled = ndimage.binary_fill_holes(labels == value)
        labels[filled & (labels == 0)] = value
    return labels
