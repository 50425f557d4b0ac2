"""The zero-shot denoiser on low-dose CT simulated in the projection domain from real CT."""

from pathlib import Path

import numpy as np
import pytest

from models.errors import Cancelled, InputRejected
from models.physics.lowdose import estimate_body_mask, simulate_low_dose
from models.pipelines.zeroshot_denoise.params import ZeroShotDenoiseParams
from models.pipelines.zeroshot_denoise.pipeline import run
from models.transforms.noise import estimate_noise_std
from models.volume import Volume
from service.io.dicom_series import load_dicom_series

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "totalsegmentator_ct" / "dicom"
FAST = {
    "max_iterations": 200,
    "min_iterations": 100,
    "crop_size": 64,
    "batch_size": 4,
    "split_features": 16,
    "features": 16,
}


@pytest.fixture(scope="module")
def low_dose() -> tuple[Volume, np.ndarray]:
    """8 real CT slices, 4x4 block-averaged to 128^2 (3.9 mm), low dose I0=2e4, 360 views."""
    series = load_dicom_series(EXAMPLE, allow_missing_study_uid=True).volume
    hu = series.array[6:14].astype(np.float32).reshape(8, 128, 4, 128, 4).mean(axis=(2, 4))
    sim = simulate_low_dose(hu, 4 * series.spacing[2], 2e4, 360, seed=3)
    affine = series.affine @ np.diag([1.0, 4.0, 4.0, 1.0])
    return Volume(sim.noisy_hu, affine, "CT", "HU"), sim.reference_hu


def psnr(x, ref, mask):
    err = np.clip(x, -1000, 1000) - np.clip(ref, -1000, 1000)
    return 10 * np.log10(2000**2 / np.mean(err[mask] ** 2))


def test_raises_psnr_and_lowers_noise_on_simulated_low_dose(low_dose):
    noisy, ref = low_dose
    mask = estimate_body_mask(ref)
    steps = []
    result = run({"image": noisy}, ZeroShotDenoiseParams(**FAST), lambda f, s: steps.append(f))
    out = result.volumes["denoised"]
    assert out.shape == noisy.shape
    np.testing.assert_array_equal(out.affine, noisy.affine)
    gain = psnr(out.array, ref, mask) - psnr(noisy.array, ref, mask)
    assert gain > 3.0, f"PSNR gain only {gain:.2f} dB"
    m = result.measurements
    assert m["method"] == "slice_split"
    assert 0.0 <= m["restored_fraction"] < 0.2
    assert m["noise_std_after"] < 0.5 * m["noise_std_before"]
    assert steps == sorted(steps)
    assert steps[-1] == pytest.approx(1.0)
    assert result.provenance.parameters["max_iterations"] == 200


def test_pair_split_path_also_denoises(low_dose):
    noisy, ref = low_dose
    mask = estimate_body_mask(ref)
    params = ZeroShotDenoiseParams(**FAST, method="pair_split")
    out = run({"image": noisy}, params, lambda f, s: None)
    assert out.measurements["method"] == "pair_split"
    assert psnr(out.volumes["denoised"].array, ref, mask) > psnr(noisy.array, ref, mask) + 1.0


def test_single_slice_uses_pair_split(low_dose):
    noisy, _ = low_dose
    one = Volume(noisy.array[3:4], noisy.affine, "CT", "HU")
    out = run({"image": one}, ZeroShotDenoiseParams(**FAST), lambda f, s: None)
    assert out.measurements["method"] == "pair_split"
    assert out.measurements["noise_std_after"] < out.measurements["noise_std_before"]


def test_same_seed_same_result_other_seed_differs(low_dose):
    noisy, _ = low_dose
    small = Volume(noisy.array[:4], noisy.affine, "CT", "HU")
    params = {**FAST, "max_iterations": 30, "min_iterations": 30}
    a = run({"image": small}, ZeroShotDenoiseParams(**params, seed=1), lambda f, s: None)
    b = run({"image": small}, ZeroShotDenoiseParams(**params, seed=1), lambda f, s: None)
    c = run({"image": small}, ZeroShotDenoiseParams(**params, seed=2), lambda f, s: None)
    np.testing.assert_array_equal(a.volumes["denoised"].array, b.volumes["denoised"].array)
    assert not np.array_equal(a.volumes["denoised"].array, c.volumes["denoised"].array)


def test_cancel_through_progress_callback(low_dose):
    noisy, _ = low_dose

    def cancel_at_half(fraction, step):
        if fraction >= 0.2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        run({"image": noisy}, ZeroShotDenoiseParams(**FAST), cancel_at_half)


def test_refuses_non_finite_and_tiny_images(low_dose):
    noisy, _ = low_dose
    bad = noisy.array.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputRejected, match="NaN"):
        run({"image": noisy.with_array(bad)}, ZeroShotDenoiseParams(**FAST), lambda f, s: None)
    tiny = Volume(np.zeros((3, 4, 4), np.float32), np.eye(4), "CT", "HU")
    with pytest.raises(InputRejected, match="too small"):
        run({"image": tiny}, ZeroShotDenoiseParams(**FAST), lambda f, s: None)


def test_mr_with_white_noise_uses_pair_split_and_helps(shared_file):
    """Real MR (3 mm, much fine structure per pixel) with white noise at 5 % of the p99 signal.

    On this image even a 0.5-pixel Gaussian raises the error; the pair split must lower it.
    """
    from scipy.ndimage import gaussian_filter

    from service.io.nifti import read_nifti

    mr = read_nifti(shared_file("totalsegmentator/example_mr_sm.nii.gz"))
    clean = mr.array.astype(np.float32)
    sigma = 0.05 * float(np.percentile(clean, 99))
    noisy = clean + np.random.default_rng(0).normal(0, sigma, clean.shape).astype(np.float32)
    result = run(
        {"image": mr.with_array(noisy, units="")}, ZeroShotDenoiseParams(**FAST), lambda f, s: None
    )
    assert result.measurements["method"] == "pair_split"
    out = result.volumes["denoised"].array
    signal = clean > np.percentile(clean, 50)

    def rmse(x):
        return np.sqrt(np.mean((x - clean)[signal] ** 2))

    assert rmse(out) < 0.95 * rmse(noisy)
    assert rmse(out) < rmse(gaussian_filter(noisy, (0, 0.5, 0.5)))
    assert estimate_noise_std(out) < estimate_noise_std(noisy)
