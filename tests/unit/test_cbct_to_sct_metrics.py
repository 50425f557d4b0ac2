"""``cbct-to-sct`` metrics (SynthRAD definitions) against independent computations.

No simulation here: random volumes, and the real held-out OpenKBP CT with known changes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from models.pipelines.cbct_to_sct.masks import body_mask
from models.pipelines.cbct_to_sct.metrics import (
    DATA_RANGE,
    HU_CLIP,
    evaluation_mask,
    image_metrics,
    mae_hu,
    psnr_db,
    ssim_in_mask,
)
from tests.unit.cbct_to_sct_data import small_ct


def _independent_ssim_mean(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """SSIM written out: 7^3 uniform means, sample (co)variances, K1 0.01, K2 0.03."""
    lo, hi = HU_CLIP
    x = np.where(mask, np.clip(a, lo, hi), lo).astype(np.float64) - lo
    y = np.where(mask, np.clip(b, lo, hi), lo).astype(np.float64) - lo
    n = 7**3

    def mean(v: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(v, size=7, mode="reflect")

    mx, my = mean(x), mean(y)
    vx = (mean(x * x) - mx * mx) * n / (n - 1)
    vy = (mean(y * y) - my * my) * n / (n - 1)
    cxy = (mean(x * y) - mx * my) * n / (n - 1)
    c1, c2 = (0.01 * 4024.0) ** 2, (0.03 * 4024.0) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    inner = (slice(3, -3),) * 3
    return float(s[inner][mask[inner]].mean())


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    ref = rng.normal(0.0, 300.0, (20, 24, 22)).astype(np.float32)
    ref[5:9, 5:9, 5:9] = 3500.0  # above the clip
    img = ref + rng.normal(20.0, 80.0, ref.shape).astype(np.float32)
    img[0, 0, 0] = -3000.0  # below the clip
    mask = np.zeros(ref.shape, dtype=bool)
    mask[2:18, 3:20, 1:21] = True
    return img, ref, mask


def test_mae_and_psnr_match_a_direct_computation(pair):
    img, ref, mask = pair
    a = np.clip(img.astype(np.float64), -1024, 3000)[mask]
    b = np.clip(ref.astype(np.float64), -1024, 3000)[mask]
    assert mae_hu(img, ref, mask) == pytest.approx(np.abs(a - b).mean(), rel=1e-12)
    mse = ((a - b) ** 2).mean()
    assert psnr_db(img, ref, mask) == pytest.approx(10 * np.log10(4024.0**2 / mse), rel=1e-12)
    assert DATA_RANGE == 4024.0


def test_ssim_matches_an_independent_implementation(pair):
    img, ref, mask = pair
    assert ssim_in_mask(img, ref, mask) == pytest.approx(
        _independent_ssim_mean(img, ref, mask), abs=1e-6
    )


def test_clipping_hides_differences_beyond_the_window():
    ref = np.full((9, 9, 9), 3000.0, dtype=np.float32)
    img = ref + 500.0  # 3500 clips to 3000
    mask = np.ones(ref.shape, dtype=bool)
    metrics = image_metrics(img, ref, mask)
    assert metrics["mae_hu"] == 0.0
    assert metrics["psnr_db"] is None  # infinite: written as null
    assert metrics["ssim"] == pytest.approx(1.0)
    assert metrics["mask_voxels"] == 9**3


def test_metrics_of_a_known_offset_on_real_ct():
    ct = small_ct()
    hu = np.asarray(ct.array, dtype=np.float32)
    mask = body_mask(hu, -500.0, 0) & (hu < 2900.0)
    shifted = hu + 50.0
    assert mae_hu(shifted, hu, mask) == pytest.approx(50.0, abs=1e-3)
    assert psnr_db(shifted, hu, mask) == pytest.approx(20 * math.log10(4024.0 / 50.0), abs=1e-4)
    assert 0.9 < ssim_in_mask(shifted, hu, mask) < 1.0
    noisy = hu + np.random.default_rng(0).normal(0, 100, hu.shape).astype(np.float32)
    assert ssim_in_mask(noisy, hu, mask) < ssim_in_mask(shifted, hu, mask)


def test_empty_or_small_masks_give_no_number():
    a = np.zeros((5, 30, 30), dtype=np.float32)
    assert math.isnan(ssim_in_mask(a, a, np.ones(a.shape, dtype=bool)))  # axis < window
    empty = np.zeros((10, 10, 10), dtype=bool)
    assert math.isnan(mae_hu(a[:5, :10, :10], a[:5, :10, :10], empty[:5]))
    assert image_metrics(np.zeros((10,) * 3), np.zeros((10,) * 3), empty)["mae_hu"] is None


def test_evaluation_mask_is_the_reference_body_inside_the_field_of_view():
    ct = small_ct()
    hu = np.asarray(ct.array, dtype=np.float32)
    fov = np.zeros(hu.shape, dtype=bool)
    fov[:, 16:48, 16:48] = True
    valid = np.ones(hu.shape, dtype=bool)
    body, mask, facts = evaluation_mask(hu, fov, valid, -500.0, 0)
    assert np.array_equal(mask, body & fov)
    assert body.sum() > mask.sum() > 0
    assert facts["voxels"] == int(mask.sum())
    outside = (body & ~fov).sum() / body.sum()
    assert facts["body_fraction_outside_fov"] == pytest.approx(outside, abs=1e-4)


def test_body_mask_keeps_the_largest_component_and_fills_holes_per_axial_slice():
    hu = np.full((12, 30, 30), -1000.0, dtype=np.float32)
    hu[2:10, 5:25, 5:25] = 0.0  # the patient
    hu[2:10, 12:16, 12:16] = -1000.0  # an airway running through every slice
    hu[2:10, 27:29, 5:25] = 200.0  # the couch, not connected
    body = body_mask(hu, -500.0, 0)
    assert not body[:, 27:29].any()  # couch dropped
    assert body[2:10, 12:16, 12:16].all()  # airway filled in each axial slice
    assert body.sum() == 8 * 20 * 20
    # slices across axis 2 cut the airway lengthwise: it opens to the slice's air, stays out
    assert not body_mask(hu, -500.0, 2)[2:10, 12:16, 12:16].any()
    within = np.zeros(hu.shape, dtype=bool)
    within[:, :, :15] = True
    assert not body_mask(hu, -500.0, 0, within=within)[:, :, 15:].any()
