"""Conjugate-ray flicking: conjugate maps, 360-degree refusal, denoising on real-CT and real data.

Data: the TotalSegmentator example CT slice (real, 3 mm; low dose simulated from it with fixed
seeds) and the real measured sarepy neutron sinogram (459 views over 360 degrees x 503 bins;
no reference exists for it, so only a reference-free noise estimate is checked).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.errors import InputRejected
from models.physics.conjugate import (
    _taps,
    conjugate_map,
    estimate_centre_offset,
    parallel_conjugate_map,
)
from models.physics.fan_geometry import FanBeamGeometry
from models.physics.fan_projector import TorchFanProjector
from models.physics.geometry import ParallelBeamGeometry
from models.physics.lowdose import estimate_body_mask, hu_to_mu, mu_to_hu, noisy_line_integrals
from models.physics.projector import TorchParallelProjector
from models.pipelines.zeroshot_denoise.sinogram import (
    FlickingConfig,
    denoise_sinogram,
    flick_masks,
    flick_pair,
    flicking_fbp,
)
from models.transforms.noise import estimate_noise_std
from tests.unit.physics_data import DATA, load_ct_slice

SAREPY = DATA / "sarepy" / "sinogram_360_neutron_image.tif"
FAST = FlickingConfig(
    copies=8,
    max_iterations=100,
    min_iterations=0,
    features=16,
    crop_size=48,
    batch_size=4,
    ensemble=2,
    seed=0,
)


@pytest.fixture(scope="module")
def slice_hu() -> np.ndarray:
    return load_ct_slice()


def _parallel_360(n: int, views: int) -> TorchParallelProjector:
    geo = ParallelBeamGeometry(n, 3.0, views, detector_spacing_mm=1.5, arc_deg=360.0)
    return TorchParallelProjector(geo)


def _psnr(x_hu: np.ndarray, ref_hu: np.ndarray, mask: np.ndarray) -> float:
    """PSNR in the body mask, HU clipped to [-1000, 1000] (data range 2000 HU)."""
    err = np.clip(x_hu, -1000, 1000) - np.clip(ref_hu, -1000, 1000)
    return 10 * math.log10(2000.0**2 / float(np.mean(err[mask] ** 2)))


def test_parallel_conjugate_is_exact_on_real_slice(slice_hu: np.ndarray) -> None:
    proj = _parallel_360(slice_hu.shape[0], 360)
    sino = proj.forward(hu_to_mu(slice_hu))
    cmap = conjugate_map(proj.geometry)
    assert cmap.exact
    assert cmap.valid.all()
    # sinogram == its conjugate: view k+V/2 flipped on the detector
    flipped = np.roll(sino, -180, axis=0)[:, ::-1]
    np.testing.assert_array_equal(cmap.apply(sino), flipped)
    assert np.max(np.abs(flipped - sino)) < 1e-5 * sino.max()
    # a half-bin offset of the axis breaks it (the map is not trivially the identity)
    shifted = parallel_conjugate_map(360, sino.shape[1], 0.5).apply(sino)
    assert np.max(np.abs(shifted - sino)) > 0.05 * sino.max()


def test_fan_conjugate_matches_within_interpolation(slice_hu: np.ndarray) -> None:
    n = slice_hu.shape[0]
    geo = FanBeamGeometry(n, 3.0, 720, 600.0, 1000.0)
    sino = TorchFanProjector(geo).forward(hu_to_mu(slice_hu))
    cmap = conjugate_map(geo)
    assert not cmap.exact
    err = np.abs(cmap.apply(sino) - sino)
    # the opposite sign convention (beta + pi + 2 gamma) is far off: the map's sign is right
    k, j = np.meshgrid(np.arange(720.0), np.arange(geo.n_det), indexing="ij")
    wrong = _taps(
        k + (math.pi + 2 * geo.fan_angles_rad) / (2 * math.pi / 720), geo.n_det - 1 - j, sino.shape
    )
    err_wrong = np.abs(wrong.apply(sino) - sino)
    assert err.mean() < 0.01 * sino.mean(), err.mean()
    assert err.mean() < 0.1 * err_wrong.mean()


def test_refuses_half_scans() -> None:
    for geo in (
        ParallelBeamGeometry(64, 1.0, 90, arc_deg=180.0),
        FanBeamGeometry(64, 1.0, 90, 200.0, 400.0, arc_deg=240.0),
    ):
        with pytest.raises(InputRejected, match="full 360 degree scan"):
            conjugate_map(geo)
    proj = TorchParallelProjector(ParallelBeamGeometry(32, 1.0, 40))
    with pytest.raises(InputRejected, match="360"):
        flicking_fbp(np.zeros(proj.geometry.sinogram_shape), proj, FAST)


def test_flicked_pair_holds_both_measurements() -> None:
    rng = np.random.default_rng(3)
    sino = rng.random((6, 5)).astype(np.float32)
    conj = parallel_conjugate_map(6, 5).apply(sino)
    masks = flick_masks(sino.shape, 3, seed=7)
    assert 0.3 < masks.mean() < 0.7
    np.testing.assert_array_equal(masks, flick_masks(sino.shape, 3, seed=7))
    a, b = flick_pair(sino, conj, masks[0])
    np.testing.assert_array_equal(a + b, sino + conj)
    assert not np.array_equal(a, sino)
    assert not np.array_equal(a, conj)


def test_flicking_beats_fbp_on_simulated_low_dose(slice_hu: np.ndarray) -> None:
    torch.set_num_threads(2)
    proj = _parallel_360(slice_hu.shape[0], 360)
    clean = proj.forward(hu_to_mu(slice_hu))
    noisy = noisy_line_integrals(clean, 1e4, np.random.default_rng(0))
    ref = mu_to_hu(proj.fbp(clean))
    mask = estimate_body_mask(ref)
    plain = _psnr(mu_to_hu(proj.fbp(noisy)), ref, mask)
    image, denoised, facts = flicking_fbp(noisy, proj, FAST)
    flicked = _psnr(mu_to_hu(image), ref, mask)
    assert denoised.shape == noisy.shape
    assert facts["conjugate_exact"]
    assert flicked > plain + 1.0, (plain, flicked)


def test_real_measured_sinogram_noise_drops() -> None:
    """Real sarepy data: no reference exists, so a reference-free noise estimate is compared."""
    if not SAREPY.exists():
        pytest.skip(f"{SAREPY} not available")
    tifffile = pytest.importorskip("tifffile")
    torch.set_num_threads(2)
    counts = tifffile.imread(SAREPY).astype(np.float64)  # (459 views, 503 bins), 360 degrees
    flat = np.percentile(counts, 99.9)
    sino = (-np.log(np.maximum(counts, 1.0) / flat)).astype(np.float32)
    offset = estimate_centre_offset(sino, 40)
    assert -10 < offset < -2  # the axis sits about 6 bins left of the detector centre
    cmap = parallel_conjugate_map(sino.shape[0], sino.shape[1], offset)
    err = np.abs(cmap.apply(sino) - sino)[cmap.valid].mean()
    err_centred = np.abs(parallel_conjugate_map(*sino.shape).apply(sino) - sino).mean()
    assert err < 0.7 * err_centred
    denoised, facts = denoise_sinogram(sino, cmap, FAST)
    # FBP with the axis moved to the detector centre (linear shift along the detector)
    from scipy.ndimage import shift

    geo = ParallelBeamGeometry(352, 1.0, sino.shape[0], sino.shape[1], 1.0, arc_deg=360.0)
    proj = TorchParallelProjector(geo)
    before, after = (
        proj.fbp(shift(s.astype(np.float64), (0, -offset), order=1, mode="nearest"))
        for s in (sino, denoised)
    )
    yy, xx = np.mgrid[:352, :352]
    disc = np.hypot(yy - 175.5, xx - 175.5) < 150
    sigma_before = estimate_noise_std(before, disc)
    sigma_after = estimate_noise_std(after, disc)
    assert sigma_after < 0.7 * sigma_before, (sigma_before, sigma_after)
    assert facts["conjugate_fraction"] > 0.95
