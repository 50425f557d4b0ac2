"""restore_detail gives back structure missing from an estimate, and leaves pure noise alone."""

import numpy as np

from models.pipelines.zeroshot_denoise.restore import restore_detail


def _noisy_pair(seed: int = 0):
    rng = np.random.default_rng(seed)
    clean = np.zeros((4, 96, 96), np.float32)
    noisy = clean + rng.normal(0, 10, clean.shape).astype(np.float32)
    return clean, noisy


def test_pure_noise_residual_is_not_restored():
    clean, noisy = _noisy_pair()
    out, fraction = restore_detail(noisy, clean.copy())
    assert fraction < 0.01
    assert np.abs(out - clean).std() < 0.5  # almost none of the sigma=10 noise comes back


def test_missing_structure_is_restored():
    clean, noisy = _noisy_pair(1)
    clean[2, 40:56, 40:56] = 200.0  # a 16x16-pixel, 200-unit object the estimate lacks
    noisy = noisy + clean
    estimate = np.zeros_like(clean)
    out, fraction = restore_detail(noisy, estimate)
    inside = out[2, 43:53, 43:53]
    assert inside.mean() > 180.0  # the object is back (smoothed residual, interior)
    assert np.abs(out[0]).max() < 20.0  # slices without structure stay at the estimate
    assert 0.0 < fraction < 0.05
