"""The ``overlay`` figure of ``segment``: label outlines and fills on three orthogonal slices.

Numpy/scipy only. The image is brought to display order with the same lossless reorientation
as the pipeline (:func:`~models.pipelines.segment.geometry.reorientation`, axes toward P, L, S),
so every panel is in radiological convention whatever the source orientation (feet-first,
prone, oblique): axial with anterior up and the patient's right on the left of the picture;
coronal and sagittal with superior up (sagittal: anterior on the left). Each panel is resampled
to square pixels of the finest in-plane spacing (image linear, labels nearest), and cut where
the labels cover the largest area in that orientation (the volume centre when nothing is
labelled).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.labels import LabelMap
from models.pipelines.segment.geometry import reorientation
from models.result import Figure
from models.volume import Volume

DISPLAY_AXES = "PLS"
"""Display frame: array axis 0 toward Posterior (rows down), 1 toward Left, 2 toward Superior."""

PANEL = 256
"""Longest side of a panel, pixels."""

_PALETTE = np.array(
    [
        [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
    ],
    dtype=np.uint8,
)  # fmt: skip
"""Colours of labels whose card gives none (cycled by value)."""


def _colours(label_map: LabelMap) -> dict[int, npt.NDArray[np.uint8]]:
    out = {}
    for info in label_map.labels:
        rgb = info.colour or tuple(_PALETTE[(info.value - 1) % len(_PALETTE)])
        out[info.value] = np.array(rgb, dtype=np.uint8)
    return out


def _panel(
    image: npt.NDArray[np.float32],
    labels: npt.NDArray[Any],
    spacing: tuple[float, float],
    window: tuple[float, float],
    colours: dict[int, npt.NDArray[np.uint8]],
) -> npt.NDArray[np.uint8]:
    """One ``(rows, cols)`` slice pair -> RGB with 35 % fills and opaque outlines."""
    pixel = min(spacing)
    zoom = (spacing[0] / pixel, spacing[1] / pixel)
    scale = PANEL / max(image.shape[0] * zoom[0], image.shape[1] * zoom[1])
    zoom = (zoom[0] * scale, zoom[1] * scale)
    img = ndimage.zoom(image.astype(np.float32), zoom, order=1)
    lab = ndimage.zoom(labels, zoom, order=0)
    lo, hi = window
    grey = (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    for value, colour in colours.items():
        mask = lab == value
        if not mask.any():
            continue
        rgb[mask] = 0.65 * rgb[mask] + 0.35 * colour
        edge = mask & ~ndimage.binary_erosion(mask)
        rgb[edge] = colour
    return rgb.astype(np.uint8)


def _busiest(labels: npt.NDArray[Any], axis: int) -> int:
    """Index along ``axis`` of the slice with the most labelled voxels (centre if none)."""
    counts = np.count_nonzero(labels, axis=tuple(a for a in range(3) if a != axis))
    return int(counts.argmax()) if counts.any() else labels.shape[axis] // 2


def overlay_figure(image: Volume, label_map: LabelMap, window: tuple[float, float]) -> Figure:
    """Axial, coronal and sagittal panels side by side.

    Args:
        image: The segmented volume (``array[k, j, i]``, affine -> LPS mm), CT in HU.
        label_map: Its label map, on the same grid.
        window: Display window ``(lower, upper)`` in image units (HU for CT).

    Returns:
        The ``overlay`` figure (RGB uint8, height ``PANEL``).
    """
    reo = reorientation(image.affine, DISPLAY_AXES)
    img = reo.apply(np.asarray(image.array, dtype=np.float32))
    lab = reo.apply(label_map.array)
    spacing = np.linalg.norm(reo.affine(image.affine, image.shape)[:3, :3], axis=0)
    p, left, s = (_busiest(lab, axis) for axis in range(3))
    colours = _colours(label_map)
    # axial: rows P-ward (anterior up), cols L-ward (patient right on the picture's left)
    axial = _panel(img[:, :, s], lab[:, :, s], (spacing[0], spacing[1]), window, colours)
    # coronal: rows S -> I (superior up), cols L-ward
    coronal = _panel(
        img[p, :, ::-1].T, lab[p, :, ::-1].T, (spacing[2], spacing[1]), window, colours
    )
    # sagittal: rows S -> I, cols P-ward (anterior on the left)
    sagittal = _panel(
        img[:, left, ::-1].T, lab[:, left, ::-1].T, (spacing[2], spacing[0]), window, colours
    )
    height = max(x.shape[0] for x in (axial, coronal, sagittal))
    panels = [
        np.pad(x, ((0, height - x.shape[0]), (0, 4), (0, 0))) for x in (axial, coronal, sagittal)
    ]
    names = ", ".join(f"{i.name}" for i in label_map.labels)
    return Figure(
        name="overlay",
        rgb=np.concatenate(panels, axis=1),
        caption=(
            f"Axial, coronal and sagittal slices where the labels cover the largest area "
            f"(display voxel P{p} L{left} S{s}), radiological convention (patient's right on "
            f"the left, superior up), window {window[0]:g} to {window[1]:g}; labels: {names}."
        ),
    )
