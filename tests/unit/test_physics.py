"""CT physics: geometry, projector (adjointness, analytic projections, FBP), low-dose simulation."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.errors import InputRejected
from models.physics.fbp_filters import FILTER_NAMES
from models.physics.geometry import ParallelBeamGeometry
from models.physics.lowdose import (
    MU_WATER_PER_MM,
    estimate_body_mask,
    hu_to_mu,
    mu_to_hu,
    simulate_low_dose,
)
from models.physics.projector import (
    Projector,
    TorchParallelProjector,
    make_projector,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
EXAMPLE_CT = DATA / "totalsegmentator" / "example_ct.nii.gz"


# --------------------------------------------------------------------------- helpers


def disc_image(n: int, pixel_mm: float, radius_mm: float, value: float) -> np.ndarray:
    """Centred disc with pixel values = covered area fraction x value (8x8 supersampling)."""
    ss = 8
    c = (np.arange(n * ss) + 0.5) / ss - n / 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    inside = (np.hypot(xx, yy) * pixel_mm < radius_mm).astype(np.float64)
    return (inside.reshape(n, ss, n, ss).mean(axis=(1, 3)) * value).astype(np.float32)


def radius_map(n: int) -> np.ndarray:
    """Distance of each pixel centre from the image centre, in pixels."""
    yy, xx = np.mgrid[:n, :n]
    return np.hypot(xx - (n - 1) / 2, yy - (n - 1) / 2)


def psnr(image: np.ndarray, truth: np.ndarray, mask: np.ndarray, data_range: float) -> float:
    mse = float(np.mean((image[mask].astype(np.float64) - truth[mask]) ** 2))
    return 10.0 * math.log10(data_range**2 / mse)


def shepp_logan(n: int) -> np.ndarray:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    return resize(shepp_logan_phantom(), (n, n), anti_aliasing=True).astype(np.float32)


def inner_circle(n: int) -> np.ndarray:
    return radius_map(n) < n / 2 - 1


def water_phantom(n: int) -> np.ndarray:
    """Water cylinder (0 HU) of radius 0.43 n in air (-1000 HU)."""
    return np.where(radius_map(n) < 0.43 * n, 0.0, -1000.0).astype(np.float32)


def nps_low_high_ratio(noise: np.ndarray) -> float:
    """Mean noise power below 0.12 cycles/pixel over that in 0.30-0.45 (1 for white noise)."""
    n = noise.shape[0]
    roi = noise[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4].astype(np.float64)
    power = np.abs(np.fft.fft2(roi - roi.mean())) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(roi.shape[0]), np.fft.fftfreq(roi.shape[1]), indexing="ij")
    f = np.hypot(fy, fx)
    return float(power[(f > 0) & (f < 0.12)].mean() / power[(f > 0.30) & (f < 0.45)].mean())


# --------------------------------------------------------------------------- geometry


def test_geometry_defaults_cover_the_diagonal() -> None:
    for n, pixel in [(512, 0.7), (256, 1.0), (5, 2.0), (33, 0.5)]:
        geo = ParallelBeamGeometry(n, pixel, 10)
        assert geo.det_spacing_mm == pixel
        assert geo.n_det % 2 == n % 2
        assert geo.n_det >= math.ceil(n * math.sqrt(2))
        # outermost bin centre beyond every pixel centre plus one interpolation footprint
        assert (geo.n_det - 1) / 2 * pixel >= (n - 1) * pixel / math.sqrt(2) + pixel - 1e-9
    assert ParallelBeamGeometry(512, 0.7, 720).n_det == 726
    finer = ParallelBeamGeometry(64, 1.0, 4, detector_spacing_mm=0.5)
    assert finer.n_det >= 2 * math.ceil(64 * math.sqrt(2)) - 2


def test_geometry_angles() -> None:
    geo = ParallelBeamGeometry(16, 1.0, 4)
    np.testing.assert_allclose(geo.angles_rad, [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4])
    full = ParallelBeamGeometry(16, 1.0, 3, arc_deg=360.0)
    np.testing.assert_allclose(full.angles_rad, [0, 2 * np.pi / 3, 4 * np.pi / 3])
    assert geo.sinogram_shape == (4, geo.n_det)
    assert geo.image_shape == (16, 16)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 0},
        {"image_size": -3},
        {"image_size": 2.5},
        {"image_size": True},
        {"pixel_size_mm": 0.0},
        {"pixel_size_mm": float("nan")},
        {"pixel_size_mm": -1.0},
        {"n_views": 0},
        {"n_views": 10_001},
        {"n_detectors": 0},
        {"detector_spacing_mm": 0.0},
        {"detector_spacing_mm": float("inf")},
        {"arc_deg": 0.0},
        {"arc_deg": 400.0},
    ],
)
def test_geometry_rejects_bad_values(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"image_size": 16, "pixel_size_mm": 1.0, "n_views": 8}
    args.update(kwargs)
    with pytest.raises(InputRejected):
        ParallelBeamGeometry(**args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- projector


def test_forward_follows_the_axis_convention() -> None:
    n, pixel = 8, 0.5
    geo = ParallelBeamGeometry(n, pixel, 2)  # 0 and 90 degrees
    image = np.random.default_rng(0).random((n, n)).astype(np.float32)
    image[1, 6] = 5.0  # asymmetric
    sino = TorchParallelProjector(geo).forward(image)
    first = (geo.n_det - n) // 2
    np.testing.assert_allclose(sino[0, first : first + n], pixel * image.sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(sino[1, first : first + n], pixel * image.sum(axis=1), rtol=1e-5)
    assert np.all(sino[:, :first] == 0)
    assert np.all(sino[:, first + n :] == 0)


# Adjointness of every operator: tests/unit/test_physics_adjoint.py


def test_batches_match_single_images() -> None:
    geo = ParallelBeamGeometry(24, 1.0, 10)
    proj = TorchParallelProjector(geo, memory_budget_mb=0.05)  # many small chunks
    rng = np.random.default_rng(1)
    images = rng.random((3, 24, 24)).astype(np.float32)
    sinos = proj.forward(images)
    assert sinos.shape == (3, 10, geo.n_det)
    assert sinos.dtype == np.float32
    for image, sino in zip(images, sinos, strict=True):
        np.testing.assert_allclose(proj.forward(image), sino, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(proj.adjoint(sinos)[1], proj.adjoint(sinos[1]), rtol=1e-5)
    np.testing.assert_allclose(proj.fbp(sinos)[2], proj.fbp(sinos[2]), rtol=1e-5, atol=1e-6)
    big = TorchParallelProjector(geo)
    np.testing.assert_allclose(big.forward(images), sinos, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("n", "pixel", "views", "spacing"), [(128, 0.5, 12, None), (97, 0.8, 7, 0.6)]
)
def test_forward_of_a_disc_matches_the_chord_length(
    n: int, pixel: float, views: int, spacing: float | None
) -> None:
    mu, radius = 0.02, 0.3 * n * pixel
    geo = ParallelBeamGeometry(n, pixel, views, detector_spacing_mm=spacing)
    sino = TorchParallelProjector(geo).forward(disc_image(n, pixel, radius, mu))
    t = geo.detector_centres_mm
    chord = 2 * mu * np.sqrt(np.clip(radius**2 - t**2, 0, None))
    away = np.abs(t) < radius - 2 * pixel
    assert np.max(np.abs(sino[:, away] - chord[away])) < 0.012 * (2 * mu * radius)
    # every view carries the whole mass: integral over t = mu * area
    mass = sino.sum(axis=1) * geo.det_spacing_mm
    np.testing.assert_allclose(mass, mu * np.pi * radius**2, rtol=2e-3)


@pytest.mark.parametrize("filter_name", FILTER_NAMES)
def test_fbp_reproduces_the_attenuation_of_a_disc(filter_name: str) -> None:
    n, pixel = 128, 0.5
    geo = ParallelBeamGeometry(n, pixel, 180)
    proj = TorchParallelProjector(geo)
    recon = proj.fbp(proj.forward(disc_image(n, pixel, 25.0, 0.02)), filter_name)  # type: ignore[arg-type]
    r_mm = radius_map(n) * pixel
    inside, outside = recon[r_mm < 20.0], recon[r_mm > 28.0]
    assert inside.mean() == pytest.approx(0.02, rel=5e-3)
    assert inside.std() < 0.01 * 0.02
    assert np.abs(outside).max() < 0.05 * 0.02


def test_fbp_over_360_degrees_has_the_same_scale() -> None:
    n = 64
    geo = ParallelBeamGeometry(n, 1.0, 120, arc_deg=360.0)
    proj = TorchParallelProjector(geo)
    recon = proj.fbp(proj.forward(disc_image(n, 1.0, 20.0, 0.02)))
    assert recon[radius_map(n) < 15].mean() == pytest.approx(0.02, rel=5e-3)


def test_fbp_quality_matches_scikit_image() -> None:
    from skimage.transform import iradon, radon

    n, views = 256, 180
    phantom = shepp_logan(n)
    mask = inner_circle(n)
    theta = np.linspace(0.0, 180.0, views, endpoint=False)
    skimage_recon = iradon(radon(phantom, theta, circle=False), theta, circle=False, output_size=n)
    proj = TorchParallelProjector(ParallelBeamGeometry(n, 1.0, views))
    ours = proj.fbp(proj.forward(phantom))
    ours_db, skimage_db = psnr(ours, phantom, mask, 1.0), psnr(skimage_recon, phantom, mask, 1.0)
    assert ours_db > 27.0
    assert ours_db > skimage_db - 0.5, (ours_db, skimage_db)


def test_matches_astra_when_installed() -> None:
    pytest.importorskip("astra")
    from models.physics.astra_backend import AstraParallelProjector

    n, views = 256, 180
    phantom = shepp_logan(n)
    mask = inner_circle(n)
    geo = ParallelBeamGeometry(n, 0.7, views)
    ours, astra = TorchParallelProjector(geo), AstraParallelProjector(geo)
    ours_sino, astra_sino = ours.forward(phantom), astra.forward(phantom)
    assert np.corrcoef(ours_sino.ravel(), astra_sino.ravel())[0, 1] > 0.999
    np.testing.assert_allclose(ours_sino, astra_sino, atol=1e-3 * float(astra_sino.max()))
    ours_db = psnr(ours.fbp(ours_sino), phantom, mask, 1.0)
    astra_db = psnr(astra.fbp(astra_sino), phantom, mask, 1.0)
    assert ours_db > astra_db - 0.5, (ours_db, astra_db)
    # the wrapper's units: a disc of 0.02/mm comes back as 0.02/mm, same angle convention
    disc = disc_image(n, 0.7, 50.0, 0.02)
    disc[60:70, 150:160] = 0.05  # off-centre block: catches flipped angles or detector
    disc_sino = ours.forward(disc)
    np.testing.assert_allclose(astra.forward(disc), disc_sino, atol=1e-3 * float(disc_sino.max()))
    assert astra.fbp(astra.forward(disc))[radius_map(n) < 30].mean() == pytest.approx(0.02, 0.01)
    x = np.random.default_rng(2).random((n, n))
    y = np.random.default_rng(3).random((views, geo.n_det))
    lhs = float(np.vdot(astra.forward(x).astype(np.float64), y))
    assert lhs == pytest.approx(float(np.vdot(x, astra.adjoint(y).astype(np.float64))), rel=1e-5)


def test_factory_and_protocol() -> None:
    geo = ParallelBeamGeometry(16, 1.0, 4)
    proj = make_projector(geo)
    assert isinstance(proj, TorchParallelProjector)
    assert isinstance(proj, Projector)
    assert proj.geometry is geo
    with pytest.raises(InputRejected):
        make_projector(geo, backend="nope")  # type: ignore[arg-type]
    with pytest.raises(InputRejected):
        make_projector(geo, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputRejected):
            make_projector(geo, device="cuda")
    if importlib_util_find("astra"):
        assert isinstance(make_projector(geo, backend="astra"), Projector)


def importlib_util_find(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_projector_rejects_bad_input() -> None:
    geo = ParallelBeamGeometry(16, 1.0, 4)
    proj = TorchParallelProjector(geo)
    with pytest.raises(InputRejected):
        proj.forward(np.zeros((16, 15)))
    with pytest.raises(InputRejected):
        proj.forward(np.zeros((1, 2, 16, 16)))
    bad = np.zeros((16, 16))
    bad[3, 3] = np.nan
    with pytest.raises(InputRejected):
        proj.forward(bad)
    with pytest.raises(InputRejected):
        proj.adjoint(np.zeros((5, geo.n_det)))
    with pytest.raises(InputRejected):
        proj.fbp(np.zeros(geo.sinogram_shape), "hamming")  # type: ignore[arg-type]
    with pytest.raises(InputRejected):
        proj.forward(np.zeros((16, 16), dtype=complex))
    with pytest.raises(InputRejected):
        TorchParallelProjector(geo, num_threads=0)


def test_num_threads_is_restored_after_a_call() -> None:
    before = torch.get_num_threads()
    proj = TorchParallelProjector(ParallelBeamGeometry(16, 1.0, 4), num_threads=1)
    proj.forward(np.ones((16, 16)))
    assert torch.get_num_threads() == before


def test_default_path_does_not_import_astra() -> None:
    code = (
        "import sys, numpy as np\n"
        "from models.physics.lowdose import simulate_low_dose\n"
        "from models.physics.projector import make_projector\n"
        "simulate_low_dose(np.zeros((16, 16)), 1.0, 1e4, 8, seed=0)\n"
        "assert 'astra' not in sys.modules, 'astra imported'\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)


# --------------------------------------------------------------------------- low dose


def test_hu_mu_conversion() -> None:
    hu = np.array([-3024.0, -1000.0, 0.0, 1000.0])
    mu = hu_to_mu(hu)
    np.testing.assert_allclose(mu, [0.0, 0.0, MU_WATER_PER_MM, 2 * MU_WATER_PER_MM], rtol=1e-6)
    np.testing.assert_allclose(mu_to_hu(mu), [-1000.0, -1000.0, 0.0, 1000.0], atol=1e-3)


def test_low_dose_is_deterministic_for_a_seed() -> None:
    phantom = water_phantom(48)
    a = simulate_low_dose(phantom, 1.0, 1e4, 60, seed=7)
    b = simulate_low_dose(phantom, 1.0, 1e4, 60, seed=7)
    c = simulate_low_dose(phantom, 1.0, 1e4, 60, seed=8)
    np.testing.assert_array_equal(a.noisy_hu, b.noisy_hu)
    np.testing.assert_array_equal(a.reference_hu, c.reference_hu)
    assert not np.array_equal(a.noisy_hu, c.noisy_hu)
    assert a.noisy_hu.shape == phantom.shape
    assert a.noisy_hu.dtype == np.float32
    assert (a.i0, a.n_views, a.geometry.n_views, a.seed) == (1e4, 60, 60, 7)


def test_low_dose_batches_and_electronic_noise() -> None:
    phantom = np.stack([water_phantom(32), np.full((32, 32), -1000.0, np.float32)])
    sim = simulate_low_dose(phantom, 1.0, 1e4, 30, seed=1, electronic_noise_std=5.0)
    assert sim.noisy_hu.shape == (2, 32, 32)
    assert sim.reference_hu.shape == (2, 32, 32)
    assert np.all(np.isfinite(sim.noisy_hu))
    assert abs(float(sim.reference_hu[1].mean()) + 1000.0) < 1.0  # air stays air
    quiet = simulate_low_dose(phantom, 1.0, 1e4, 30, seed=1)
    assert not np.array_equal(quiet.noisy_hu, sim.noisy_hu)


def test_noise_falls_as_one_over_sqrt_i0_and_is_correlated() -> None:
    n = 128
    phantom = water_phantom(n)
    roi = radius_map(n) < 0.3 * n
    proj = TorchParallelProjector(ParallelBeamGeometry(n, 1.0, 360, detector_spacing_mm=0.5))
    stds, ratios = [], []
    for i0 in (1e4, 4e4):
        sim = simulate_low_dose(phantom, 1.0, i0, 360, seed=3, projector=proj)
        noise = sim.noisy_hu - sim.reference_hu
        assert abs(float(noise[roi].mean())) < 3.0  # unbiased in water
        stds.append(float(noise[roi].std()))
        ratios.append(nps_low_high_ratio(noise))
    assert stds[0] / stds[1] == pytest.approx(2.0, rel=0.25)
    # ramp-filtered FBP noise: little power at low frequencies (measured ~0.28), while white
    # noise has a flat spectrum (ratio ~1, measured 0.8-1.2 here)
    white = nps_low_high_ratio(np.random.default_rng(0).standard_normal((n, n)))
    assert max(ratios) < 0.45 < white
    # a smoothing kernel turns it into blotchy noise: strong neighbour correlation (~0.6)
    sim = simulate_low_dose(phantom, 1.0, 1e4, 360, seed=3, projector=proj, filter_name="hann")
    noise = sim.noisy_hu - sim.reference_hu
    both = roi[:, :-1] & roi[:, 1:]
    corr = np.corrcoef(noise[:, :-1][both], noise[:, 1:][both])[0, 1]
    assert corr > 0.3


def test_body_mask_keeps_the_largest_region_and_fills_holes() -> None:
    n = 64
    r = radius_map(n)
    image = np.full((n, n), -1000.0)
    image[r < 20] = 40.0
    image[r < 6] = -900.0  # lung-like hole
    image[2:5, 2:5] = 200.0  # small separate object (table, cable)
    mask = estimate_body_mask(image)
    np.testing.assert_array_equal(mask, r < 20)
    assert not estimate_body_mask(np.full((8, 8), -1000.0)).any()
    assert estimate_body_mask(np.stack([image, image])).shape == (2, n, n)


def test_low_dose_rejects_bad_input() -> None:
    with pytest.raises(InputRejected):
        simulate_low_dose(np.zeros((16, 12)), 1.0, 1e4, 8, seed=0)
    with pytest.raises(InputRejected):
        simulate_low_dose(np.zeros((16, 16)), 1.0, 0.0, 8, seed=0)
    with pytest.raises(InputRejected):
        simulate_low_dose(np.zeros((16, 16)), 1.0, 1e4, 8, seed=0, electronic_noise_std=-1.0)
    other = TorchParallelProjector(ParallelBeamGeometry(16, 2.0, 8))
    with pytest.raises(InputRejected):
        simulate_low_dose(np.zeros((16, 16)), 1.0, 1e4, 8, seed=0, projector=other)


@pytest.fixture(scope="module")
def ct_slice() -> np.ndarray:
    """Middle axial slice of the TotalSegmentator example CT (3 mm pixels), padded square."""
    if not EXAMPLE_CT.exists():
        pytest.skip(f"{EXAMPLE_CT} not available")
    nib = pytest.importorskip("nibabel")
    volume = np.asarray(nib.load(EXAMPLE_CT).dataobj, dtype=np.float32)  # (x, y, z)
    axial = volume[:, :, volume.shape[2] // 2].T  # rows along y, columns along x
    side = max(axial.shape)
    square = np.full((side, side), -1024.0, dtype=np.float32)
    top, left = (side - axial.shape[0]) // 2, (side - axial.shape[1]) // 2
    square[top : top + axial.shape[0], left : left + axial.shape[1]] = axial
    return square


def test_reference_of_a_real_ct_slice_stays_close_to_it(ct_slice: np.ndarray) -> None:
    sim = simulate_low_dose(ct_slice, 3.0, 5e4, 720, seed=0)
    body = estimate_body_mask(ct_slice)
    assert body.sum() > 0.3 * body.size

    def window(a: np.ndarray) -> np.ndarray:
        return np.clip(a, -1000.0, 1000.0)

    ref_db = psnr(window(sim.reference_hu), window(ct_slice), body, 2000.0)
    noisy_db = psnr(window(sim.noisy_hu), window(ct_slice), body, 2000.0)
    assert ref_db > 35.0, ref_db  # measured 36.0 dB
    assert noisy_db < ref_db - 0.3  # the noise costs something at 5e4 photons
