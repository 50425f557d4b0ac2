"""Zero-shot denoising benchmark on low-dose CT simulated from a real CT series.

Data: the bundled real CT (examples/totalsegmentator_ct, 20 slices of 512x512, 0.977 mm).
Low dose is simulated in the projection domain (parallel beam, 720 views over 180 degrees,
Poisson noise at I0 photons per detector bin, log, ram-lak FBP; seeds fixed); the reference
is the FBP of the noise-free sinogram with the same geometry.

Metrics: PSNR and SSIM inside the body mask (largest region > -500 HU of the reference, holes
filled), on HU clipped to [-1000, 1000] (data range 2000 HU). Seconds are wall-clock per
512x512 slice on this machine's CPU threads (``--threads``).

Methods, side by side in one run:
  noisy           the simulated low-dose FBP
  gaussian        Gaussian filter, sigma picked from a grid by PSNR against the reference
                  (oracle-tuned: an upper bound for a Gaussian)
  bm3d            PyPI bm3d, white-noise model with the oracle noise std in the body, and
                  coloured-noise BM3D given the oracle noise power spectrum (from the true
                  noise of the benchmarked slices): the strongest BM3D can be here
  zsn2n-plain     ZS-N2N as published: one network per 2D image, 2,000 Adam steps at 1e-3
                  halved at 1,000, on a centre crop (``--plain-crop``) of ``--plain-slices``
                  slices; seconds scaled to a 512x512 slice by pixel count (compute is linear)
  ours            voxelgate zeroshot-denoise with default parameters, whole volume

Usage: python benchmarks/denoise.py [--threads 2] [--plain-slices 1] [--plain-crop 256]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import bm3d
import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from models.networks.zsn2n import ZSN2NNet
from models.physics.lowdose import estimate_body_mask, simulate_low_dose
from models.pipelines.zeroshot_denoise.fit import CropSampler, FitConfig, train
from models.pipelines.zeroshot_denoise.params import ZeroShotDenoiseParams
from models.pipelines.zeroshot_denoise.pipeline import run
from models.pipelines.zeroshot_denoise.splits import pair_split_loss, pair_split_predict
from models.transforms.intensity import Normaliser
from models.volume import Volume
from service.io.dicom_series import load_dicom_series

if not hasattr(np, "trapz"):  # bm4d 4.2 (under bm3d's coloured-noise path) calls np.trapz,
    np.trapz = np.trapezoid  # removed in NumPy 2.4; same function under its new name.

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "totalsegmentator_ct" / "dicom"
WINDOW = (-1000.0, 1000.0)
DOSES = ((1e4, 0), (5e4, 1))  # (I0, seed)


def psnr(x: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    lo, hi = WINDOW
    err = np.clip(x, lo, hi) - np.clip(ref, lo, hi)
    return float(10 * np.log10((hi - lo) ** 2 / np.mean(err[mask] ** 2)))


def ssim(x: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    lo, hi = WINDOW
    values = []
    for k in range(x.shape[0]):
        _, smap = structural_similarity(
            np.clip(ref[k], lo, hi), np.clip(x[k], lo, hi), data_range=hi - lo, full=True
        )
        values.append(smap[mask[k]])
    return float(np.mean(np.concatenate(values)))


def gaussian_oracle(
    noisy: np.ndarray, ref: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, float]:
    best = max(
        (psnr(gaussian_filter(noisy[:1], (0, s, s)), ref[:1], mask[:1]), s)
        for s in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
    )
    return gaussian_filter(noisy, (0, best[1], best[1])), best[1]


def noise_psd(noise: np.ndarray) -> np.ndarray:
    """Oracle noise power spectrum (H, W) from noise realisations (B, H, W), lightly smoothed.

    Scaled as bm3d expects: a white noise of variance v has a flat PSD equal to v * H * W.
    """
    power = np.mean(np.abs(np.fft.fft2(noise)) ** 2, axis=0)
    return gaussian_filter(power, 2.0, mode="wrap")  # the spectrum is periodic


def zsn2n_plain(image: np.ndarray, seed: int) -> np.ndarray:
    """Published ZS-N2N on one 2D image (H, W), normalised internally."""
    norm = Normaliser.robust(image)
    vol = norm.forward(image[None])
    torch.manual_seed(seed)
    net = ZSN2NNet(1, 1, 48)
    cfg = FitConfig(
        max_iterations=2000,
        min_iterations=2000,
        patience=2000,
        tolerance=0.0,
        learning_rate=1e-3,
        crop_size=max(image.shape),
        batch_size=1,
        seed=seed,
        early_stopping=False,
        lr_step=1000,
    )
    sampler = CropSampler(
        lambda k: vol[k : k + 1], 1, image.shape, cfg.crop_size, np.random.default_rng(seed)
    )
    train(net, sampler, pair_split_loss, cfg, torch.device("cpu"), lambda f, i: None)
    with torch.no_grad():
        out = pair_split_predict(net, torch.from_numpy(vol[None]))[0, 0].numpy()
    return norm.inverse(out)


def row(
    name: str, x: np.ndarray, ref: np.ndarray, mask: np.ndarray, sec: float, note: str = ""
) -> None:
    print(
        f"| {name:28s} | {psnr(x, ref, mask):6.2f} | {ssim(x, ref, mask):6.4f} "
        f"| {sec:9.2f} | {note}"
    )


def bench_dose(series: Volume, i0: float, seed: int, args: argparse.Namespace) -> None:
    hu, spacing = series.array.astype(np.float32), series.spacing[2]
    t = time.perf_counter()
    sim = simulate_low_dose(hu, spacing, i0, 720, seed=seed)
    noisy, ref = sim.noisy_hu, sim.reference_hu
    mask = estimate_body_mask(ref)
    k = noisy.shape[0]
    sigma = float((noisy - ref)[mask].std())
    print(
        f"\n### I0 = {i0:.0e} (seed {seed}): {k} slices, oracle noise std in body {sigma:.1f} HU, "
        f"simulation {time.perf_counter() - t:.0f} s"
    )
    print("| method                       | PSNR dB | SSIM   | s / slice | note")
    print("|---|---|---|---|---|")
    row("noisy (low-dose FBP)", noisy, ref, mask, 0.0)
    t = time.perf_counter()
    gauss, s = gaussian_oracle(noisy, ref, mask)
    row("gaussian (oracle sigma)", gauss, ref, mask, (time.perf_counter() - t) / k, f"sigma {s} px")
    t = time.perf_counter()
    params = ZeroShotDenoiseParams()
    result = run({"image": series.with_array(noisy)}, params, lambda f, s: None)
    ours = result.volumes["denoised"].array
    ours_sec = (time.perf_counter() - t) / k
    row(
        "ours (zeroshot-denoise)",
        ours,
        ref,
        mask,
        ours_sec,
        f"{result.measurements['method']}, {result.measurements['iterations']} it",
    )
    subset = list(range(0, k, max(1, k // args.bm3d_slices)))[: args.bm3d_slices]
    t = time.perf_counter()
    bm = np.stack([bm3d.bm3d(noisy[j], sigma_psd=sigma) for j in subset])
    row(
        f"bm3d (oracle sigma) {len(subset)} sl",
        bm,
        ref[subset],
        mask[subset],
        (time.perf_counter() - t) / len(subset),
    )
    psd = noise_psd(noisy[subset] - ref[subset])
    t = time.perf_counter()
    bm_psd = np.stack([bm3d.bm3d(noisy[j], sigma_psd=psd) for j in subset])
    row(
        f"bm3d (oracle PSD) {len(subset)} sl",
        bm_psd,
        ref[subset],
        mask[subset],
        (time.perf_counter() - t) / len(subset),
        "coloured-noise BM3D given the true noise spectrum",
    )
    row(f"ours on the same {len(subset)} slices", ours[subset], ref[subset], mask[subset], ours_sec)
    if args.plain_slices == 0:
        return
    c, h, w = args.plain_crop, noisy.shape[1], noisy.shape[2]
    ys, xs = slice((h - c) // 2, (h + c) // 2), slice((w - c) // 2, (w + c) // 2)
    plain_idx = subset[len(subset) // 2 : len(subset) // 2 + args.plain_slices]
    t = time.perf_counter()
    plain = np.stack([zsn2n_plain(noisy[j, ys, xs], seed) for j in plain_idx])
    per_crop = (time.perf_counter() - t) / len(plain_idx)
    crop = (plain_idx, ys, xs)
    row(
        f"zsn2n-plain {c}^2 crop x{len(plain_idx)}",
        plain,
        ref[crop],
        mask[crop],
        per_crop * h * w / c**2,
        f"{per_crop:.0f} s per {c}^2 crop, scaled to 512^2",
    )
    row("ours on the same crop", ours[crop], ref[crop], mask[crop], ours_sec)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bm3d-slices", type=int, default=4)
    parser.add_argument("--plain-slices", type=int, default=1)
    parser.add_argument("--plain-crop", type=int, default=256)
    parser.add_argument("--doses", default="1e4,5e4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    series = load_dicom_series(EXAMPLE, allow_missing_study_uid=True).volume
    hu = series.array.astype(np.float32)
    print(
        f"Real CT {EXAMPLE.parent.name}: {hu.shape}, pixel {series.spacing[2]:.3f} mm; "
        f"torch threads {args.threads}; PSNR/SSIM in body mask, HU clipped to {WINDOW}"
    )
    wanted = {float(d) for d in args.doses.split(",")}
    for i0, seed in DOSES:
        if i0 in wanted:
            bench_dose(series, i0, seed, args)


if __name__ == "__main__":
    main()
