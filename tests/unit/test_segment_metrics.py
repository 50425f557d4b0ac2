"""Dice, HD95 and surface Dice of label maps, against closed forms and MONAI's implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from models.pipelines.segment.metrics import dice, hd95, surface_dice


def _ball(shape: tuple[int, int, int], centre: tuple[float, float, float], r: float) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    return ((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0) <= r * r


def test_shifted_cube_hd95_is_the_shift_in_mm() -> None:
    a = np.zeros((30, 30, 30), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 3, axis=2)
    assert hd95(a, b, (1.0, 1.0, 2.0)) == pytest.approx(6.0)
    assert hd95(a, a, (1.0, 1.0, 1.0)) == 0.0
    assert dice(a, b) == pytest.approx(7 / 10)


def test_matches_monai_on_anisotropic_balls() -> None:
    a = _ball((40, 40, 30), (20, 20, 15), 9)
    b = _ball((40, 40, 30), (22, 19, 14), 7)
    spacing = (0.8, 0.8, 2.5)
    ours = hd95(a, b, spacing)
    ref = compute_hausdorff_distance(
        torch.from_numpy(a)[None, None],
        torch.from_numpy(b)[None, None],
        percentile=95,
        spacing=spacing,
    )
    assert ours == pytest.approx(float(ref), rel=0.02)
    assert ours > 0


def test_empty_masks() -> None:
    a = np.zeros((8, 8, 8), bool)
    b = a.copy()
    b[2:4, 2:4, 2:4] = True
    assert hd95(a, a, (1, 1, 1)) == 0.0
    assert hd95(a, b, (1, 1, 1)) == float("inf")
    assert dice(a, a) == 1.0
    assert dice(a, b) == 0.0


def test_surface_dice_of_a_shifted_cube_counts_faces_within_the_tolerance() -> None:
    a = np.zeros((30, 30, 30), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 3, axis=2)  # 3 voxels of 2 mm: 6 mm along axis 2
    spacing = (1.0, 1.0, 2.0)
    assert surface_dice(a, b, spacing, 6.0) == 1.0
    assert surface_dice(a, a, spacing, 0.0) == 1.0
    loose = surface_dice(a, b, spacing, 5.9)
    assert 0.0 < loose < 1.0
    # With 1 mm voxels every boundary voxel is within 3 mm of the other surface, Dice is 0.7.
    assert surface_dice(a, b, (1.0, 1.0, 1.0), 3.0) == 1.0 > dice(a, b)


def test_surface_dice_matches_monai_on_anisotropic_balls() -> None:
    a = _ball((40, 40, 30), (20, 20, 15), 9)
    b = _ball((40, 40, 30), (22, 19, 14), 7)
    spacing = (0.8, 0.8, 2.5)
    for tau in (0.0, 1.0, 2.5, 4.0):
        ours = surface_dice(a, b, spacing, tau)
        onehot = [torch.from_numpy(np.stack([~m, m]))[None] for m in (a, b)]
        ref = compute_surface_dice(onehot[0], onehot[1], [tau], spacing=spacing)
        assert ours == pytest.approx(float(ref), abs=1e-6), tau
    assert surface_dice(a, b, spacing, 0.0) < surface_dice(a, b, spacing, 4.0)


def test_surface_dice_empty_masks_and_bad_tolerance() -> None:
    a = np.zeros((8, 8, 8), bool)
    b = a.copy()
    b[2:4, 2:4, 2:4] = True
    assert surface_dice(a, a, (1, 1, 1), 1.0) == 1.0
    assert surface_dice(a, b, (1, 1, 1), 1.0) == 0.0
    with pytest.raises(ValueError, match="tolerance_mm"):
        surface_dice(b, b, (1, 1, 1), -1.0)
