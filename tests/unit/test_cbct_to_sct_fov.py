"""CBCT field of view estimated from the volume alone, against the simulator's true mask.

CBCTs are simulated from the held-out OpenKBP CT (``cbct_to_sct_data``): one cut to a 200 mm
field of view (the shoulders are truncated), one whose detector covers the whole grid.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from models.pipelines.cbct_to_sct.fov import detect_padding, estimate_fov
from models.pipelines.cbct_to_sct.masks import axial_axis
from models.volume import Volume
from tests.unit.cbct_to_sct_data import full_ct, simulated


@pytest.fixture(scope="module")
def truncated() -> tuple[Volume, np.ndarray]:
    cbct, fov = simulated("truncated")
    return cbct, np.asarray(fov.array, dtype=bool)


def test_estimated_fov_equals_the_simulator_mask(truncated):
    cbct, true = truncated
    assert 0.02 < true.mean() < 0.5  # a real cut: a cylinder narrower than the grid
    fov = estimate_fov(cbct, axial_axis(cbct), -500.0)
    assert fov.padding_hu == -1000.0
    assert fov.facts["padding_source"] == "detected"
    assert np.array_equal(fov.mask, true)
    assert fov.facts["fraction"] == pytest.approx(true.mean(), abs=1e-4)
    assert max(fov.radius_mm) <= 100.0 + 1e-6  # 200 mm diameter


def test_truncated_body_is_flagged_with_how_much(truncated):
    cbct, _true = truncated
    facts = estimate_fov(cbct, axial_axis(cbct), -500.0).facts
    assert facts["truncated"] is True
    assert facts["boundary_body_fraction"] > 0.1
    assert facts["slices_truncated"] > facts["slices"] // 2
    assert "touches the CBCT field-of-view boundary" in facts["message"]


def test_air_equal_to_the_padding_inside_the_fov_does_not_open_holes(truncated):
    cbct, true = truncated
    hu = np.array(cbct.array)
    air = true & (hu < -900)
    rng = np.random.default_rng(0)
    hu[air & (rng.random(hu.shape) < 0.3)] = -1000.0  # a third of the air hits the padding
    fov = estimate_fov(cbct.with_array(hu), axial_axis(cbct), -500.0)
    assert (fov.mask != true).sum() <= 0.02 * true.sum()
    assert not (fov.mask & ~true).any()  # never beyond the cylinder


def test_untruncated_cbct_covers_the_grid_and_is_not_flagged():
    cbct, true = simulated("scatter")
    assert np.asarray(true.array).all()
    fov = estimate_fov(cbct, axial_axis(cbct), -500.0)
    assert fov.padding_hu is None
    assert fov.mask.all()
    assert fov.facts["truncated"] is False


def test_a_planning_ct_with_clipped_air_has_no_cylinder():
    ct = full_ct()  # OpenKBP: -1024 HU everywhere outside the body
    assert detect_padding(np.asarray(ct.array), axial_axis(ct)) == -1024.0
    fov = estimate_fov(ct, axial_axis(ct), -500.0)
    assert fov.mask.all()
    assert fov.padding_hu is None
    assert "not a cylinder" in fov.facts["method"]


def test_padding_can_be_named_and_another_axial_axis_is_followed(truncated):
    cbct, true = truncated
    hu = np.where(true, np.asarray(cbct.array), -1024.0).astype(np.float32)
    # the same scan stored with the axial axis last: (i, j, k) order, affine permuted
    perm = cbct.affine[:, [2, 1, 0, 3]]
    moved = Volume(np.ascontiguousarray(hu.transpose(2, 1, 0)), perm, "CT", "HU")
    assert axial_axis(moved) == 2
    fov = estimate_fov(moved, 2, -500.0, padding_hu=-1024.0)
    assert fov.facts["padding_source"] == "parameter"
    assert np.array_equal(fov.mask, true.transpose(2, 1, 0))
    wrong = estimate_fov(dataclasses.replace(moved), 2, -500.0, padding_hu=-1000.0)
    assert wrong.mask.all()  # nothing holds -1000 exactly: no cylinder, the whole grid
