"""The ``difference`` figure of ``cbct-to-sct``: CBCT | sCT | reference | sCT - reference.

Numpy/scipy only. Volumes are brought to display order with the lossless reorientation of
:mod:`models.pipelines.segment.geometry` (axes toward P, L, S), so both rows are in
radiological convention whatever the source orientation: an axial slice (anterior up, the
patient's right on the picture's left) and a coronal slice (superior up), through the centre of
the evaluated region (the body inside the field of view). CT panels use the soft-tissue window
(:func:`models.transforms.intensity.display_window`); the difference uses a blue-white-red
diverging map over +-:data:`DIFF_RANGE_HU`, with a colour bar (red on top = sCT above the
reference), and mid grey where nothing is compared (outside the field of view, the body or
the reference). Without a reference the figure is CBCT | sCT.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.pipelines.segment.geometry import reorientation
from models.result import Figure
from models.transforms.intensity import Window, display_window
from models.volume import Volume

DISPLAY_AXES = "PLS"
"""Display frame: array axis 0 toward Posterior (rows down), 1 toward Left, 2 toward Superior."""

DIFF_RANGE_HU = 300.0
"""The difference map saturates at +-this many HU."""

PANEL = 200
"""Longest side of a panel, pixels."""

MARGIN = 3
"""Voxels shown around the ``extent`` of the figure."""

_BLUE = np.array([59.0, 76.0, 192.0])
_RED = np.array([180.0, 4.0, 38.0])
_WHITE = np.array([247.0, 247.0, 247.0])
_GREY = np.array([128.0, 128.0, 128.0])


def diverging(
    diff_hu: npt.NDArray[np.floating], valid: npt.NDArray[np.bool_]
) -> npt.NDArray[np.uint8]:
    """RGB of a 2D difference (HU): blue at -:data:`DIFF_RANGE_HU`, white at 0, red at +.

    Pixels where ``valid`` is False are mid grey.
    """
    t = np.clip(np.asarray(diff_hu, dtype=np.float64) / DIFF_RANGE_HU, -1.0, 1.0)[..., None]
    rgb = np.where(t >= 0, _WHITE + t * (_RED - _WHITE), _WHITE - t * (_BLUE - _WHITE))
    rgb = np.where(valid[..., None], rgb, _GREY)
    return (rgb + 0.5).astype(np.uint8)


def _colour_bar(height: int) -> npt.NDArray[np.uint8]:
    """A vertical bar, +:data:`DIFF_RANGE_HU` at the top to - at the bottom, 10 px wide."""
    values = np.linspace(DIFF_RANGE_HU, -DIFF_RANGE_HU, height)[:, None].repeat(10, axis=1)
    return diverging(values, np.ones(values.shape, dtype=bool))


def _scale(spacing: tuple[float, float], shape: tuple[int, int]) -> tuple[float, float]:
    """Zoom giving square pixels and a longest side of :data:`PANEL` pixels."""
    pixel = min(spacing)
    zoom = (spacing[0] / pixel, spacing[1] / pixel)
    scale = PANEL / max(shape[0] * zoom[0], shape[1] * zoom[1])
    return (zoom[0] * scale, zoom[1] * scale)


def _grey(
    image: npt.NDArray[np.float32], zoom: tuple[float, float], window: Window
) -> npt.NDArray[np.uint8]:
    grey = window.to_uint8(ndimage.zoom(image, zoom, order=1))
    return np.repeat(grey[..., None], 3, axis=2)


def _row(
    slices: list[npt.NDArray[np.float32]],
    diff: tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]] | None,
    spacing: tuple[float, float],
    window: Window,
) -> npt.NDArray[np.uint8]:
    """One row of panels (grey images, then the difference map and its bar), 4 px apart."""
    zoom = _scale(spacing, (slices[0].shape[0], slices[0].shape[1]))
    panels = [_grey(s, zoom, window) for s in slices]
    if diff is not None:
        values = ndimage.zoom(diff[0], zoom, order=1)
        valid = ndimage.zoom(diff[1].astype(np.uint8), zoom, order=0).astype(bool)
        panels.append(diverging(values, valid))
        panels.append(_colour_bar(values.shape[0]))
    gap = np.zeros((panels[0].shape[0], 4, 3), dtype=np.uint8)
    parts: list[npt.NDArray[np.uint8]] = []
    for p in panels:
        parts.extend([p, gap])
    return np.concatenate(parts[:-1], axis=1)


def _stack(rows: list[npt.NDArray[np.uint8]]) -> npt.NDArray[np.uint8]:
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(padded, axis=0)[:-4]


def _box(extent: npt.NDArray[np.bool_], margin: int) -> tuple[slice, slice, slice]:
    """Bounding box of ``extent`` grown by ``margin`` voxels (the whole grid if empty)."""
    if not extent.any():
        return (slice(None), slice(None), slice(None))
    box = []
    for axis in range(3):
        hits = np.flatnonzero(extent.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), int(hits[-1]) + margin + 1))
    return (box[0], box[1], box[2])


def _centre(region: npt.NDArray[np.bool_]) -> tuple[int, int, int]:
    """Centre of mass (display indices) of ``region``, the grid centre when it is empty."""
    if not region.any():
        return (region.shape[0] // 2, region.shape[1] // 2, region.shape[2] // 2)
    c = ndimage.center_of_mass(region)
    return (round(c[0]), round(c[1]), round(c[2]))


def difference_figure(
    cbct: Volume,
    sct: npt.NDArray[np.float32],
    region: npt.NDArray[np.bool_],
    reference: npt.NDArray[np.float32] | None = None,
    extent: npt.NDArray[np.bool_] | None = None,
) -> Figure:
    """Axial and coronal rows of CBCT | sCT (| reference | sCT - reference).

    Args:
        cbct: The CBCT (its grid orients the display), HU, ``array[k, j, i]``.
        sct: The sCT on the CBCT grid, HU, ``(K, J, I)``.
        region: Where the images are compared (reference body inside the field of view), or
            the sCT body inside the field of view without a reference; picks the slices.
        reference: The reference CT on the CBCT grid (HU), or ``None``.
        extent: What the panels must show (e.g. the whole body, also outside the field of
            view), boolean on the CBCT grid: they are cut to its bounding box plus
            :data:`MARGIN` voxels; ``None``: the whole grid.

    Returns:
        The ``difference`` figure (RGB uint8).
    """
    reo = reorientation(cbct.affine, DISPLAY_AXES)
    volumes = [np.asarray(cbct.array, dtype=np.float32), np.asarray(sct, dtype=np.float32)]
    if reference is not None:
        volumes.append(np.asarray(reference, dtype=np.float32))
    box = _box(reo.apply(extent), MARGIN) if extent is not None else (slice(None),) * 3
    shown = [reo.apply(v)[box] for v in volumes]
    mask = reo.apply(region)[box]
    spacing = np.linalg.norm(reo.affine(cbct.affine, cbct.shape)[:3, :3], axis=0)
    p, _, s = _centre(mask)  # display indices inside the box
    window = display_window(shown[0], "HU")
    axial_diff = coronal_diff = None
    if reference is not None:
        diff = shown[1] - shown[2]
        axial_diff = (diff[:, :, s], mask[:, :, s])
        coronal_diff = (diff[p, :, ::-1].T, mask[p, :, ::-1].T)
    axial = _row([v[:, :, s] for v in shown], axial_diff, (spacing[0], spacing[1]), window)
    coronal = _row([v[p, :, ::-1].T for v in shown], coronal_diff, (spacing[2], spacing[1]), window)
    names = "CBCT | sCT | reference CT | sCT - reference" if reference is not None else "CBCT | sCT"
    diff_note = (
        f"; difference in a blue-white-red map from -{DIFF_RANGE_HU:g} to +{DIFF_RANGE_HU:g} HU "
        "(red: sCT above the reference; bar on the right), grey where not compared (outside "
        "the body, the CBCT field of view or the reference)"
        if reference is not None
        else ""
    )
    return Figure(
        name="difference",
        rgb=_stack([axial, coronal]),
        caption=(
            f"{names}: axial (top, display slice S{s}) and coronal (bottom, P{p}) through the "
            "centre of the compared region, radiological convention (patient's right on the "
            f"left, anterior/superior up); images in window {window.name}{diff_note}."
        ),
    )
