"""The ``overlay`` figure of ``segment`` is in radiological convention whatever the grid.

A block on the patient's right and anterior (LPS: x < 0, y < 0) and one superior-left are drawn
on volumes stored head-first, feet-first (k toward Superior, i toward Right) and permuted
(sagittal stack); in every case the axial panel shows the right-anterior block on its left and
upper half, and the coronal panel shows the superior block in its upper half.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.labels import LabelInfo, LabelMap
from models.pipelines.segment.overlay import PANEL, overlay_figure
from models.volume import Volume

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _case(direction: np.ndarray) -> tuple[Volume, LabelMap]:
    """A 40³ 2 mm grid centred at the LPS origin with the given axis directions (k, j, i)."""
    n, spacing = 40, 2.0
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = -affine[:3, :3] @ np.full(3, (n - 1) / 2)
    grid = Volume(np.zeros((n, n, n), np.float32), affine, modality="CT", units="HU")
    world = grid.index_to_lps(np.indices((n, n, n)).reshape(3, -1).T).reshape(n, n, n, 3)
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    labels = np.zeros((n, n, n), np.uint8)
    labels[(x < -10) & (x > -30) & (y < -10) & (y > -30) & (np.abs(z) < 8)] = 1  # R, A
    labels[(x > 10) & (x < 30) & (np.abs(y) < 8) & (z > 10) & (z < 30)] = 2  # L, S
    image = grid.with_array(np.where(labels > 0, 60.0, -20.0).astype(np.float32))
    infos = (LabelInfo(1, "right-anterior", colour=RED), LabelInfo(2, "left-superior", colour=BLUE))
    return image, LabelMap.on_grid(image, labels, infos)


def _where(rgb: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.argwhere(np.all(rgb == np.array(colour, np.uint8), axis=2))


GRIDS = {
    # columns are the LPS directions of array axes k, j, i
    "axial head-first (k toward I)": np.array([[0, 0, 1.0], [0, 1.0, 0], [-1.0, 0, 0]]).T,
    "feet-first (k toward S, i toward R)": np.array([[0, 0, -1.0], [0, 1.0, 0], [1.0, 0, 0]]).T,
    "sagittal stack (k toward L)": np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]]).T,
}


@pytest.mark.parametrize("name", list(GRIDS))
def test_panels_are_radiological(name: str) -> None:
    direction = GRIDS[name]
    assert np.isclose(abs(np.linalg.det(direction)), 1.0)
    image, label_map = _case(direction)
    figure = overlay_figure(image, label_map, (-160.0, 240.0))
    assert figure.rgb.dtype == np.uint8
    assert figure.rgb.shape[0] == PANEL
    width = figure.rgb.shape[1] // 3
    axial = figure.rgb[:, :width]
    coronal = figure.rgb[:, width : 2 * width]
    red = _where(axial, RED)
    assert red.size, name
    rows, cols = axial.shape[0], axial.shape[1]
    assert red[:, 1].mean() < cols / 2, f"{name}: patient right must be on the picture's left"
    assert red[:, 0].mean() < rows / 2, f"{name}: anterior must be up in the axial panel"
    blue = _where(coronal, BLUE)
    assert blue.size, name
    assert blue[:, 0].mean() < rows / 2, f"{name}: superior must be up in the coronal panel"
    assert blue[:, 1].mean() > width / 2, f"{name}: patient left on the picture's right"
    assert "radiological" in figure.caption
