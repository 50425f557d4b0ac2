"""Comparison figures as RGB arrays (the PNG encoding lives in service/io)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from models.transforms.intensity import Window


def representative_slices(n_slices: int, count: int = 3) -> list[int]:
    """Evenly spread slice indices inside the volume (quartiles for ``count=3``)."""
    if n_slices <= count:
        return list(range(n_slices))
    return [round((n_slices - 1) * (q + 1) / (count + 1)) for q in range(count)]


def before_after_grid(
    before: npt.NDArray[np.floating],
    after: npt.NDArray[np.floating],
    slices: list[int],
    window: Window,
    diff_width: float,
) -> npt.NDArray[np.uint8]:
    """Rows of ``[before | after | before - after]`` for the given slices.

    Args:
        before: ``(K, H, W)`` input in image units.
        after: ``(K, H, W)`` output on the same grid.
        slices: Slice indices ``k`` to show, one row each (displayed top to bottom).
        window: Display window for before/after.
        diff_width: Full width of the symmetric window for the difference (image units).

    Returns:
        ``(len(slices) * H, 3 * W, 3)`` uint8 RGB image. Rows are displayed as stored
        (``j`` down, ``i`` right), i.e. radiological view for an axial LPS series.
    """
    diff_window = Window(0.0, diff_width, "difference")
    rows = []
    for k in slices:
        panels = [
            window.to_uint8(before[k]),
            window.to_uint8(after[k]),
            diff_window.to_uint8(before[k] - after[k]),
        ]
        rows.append(np.concatenate(panels, axis=1))
    grey = np.concatenate(rows, axis=0)
    return np.repeat(grey[..., None], 3, axis=2)
