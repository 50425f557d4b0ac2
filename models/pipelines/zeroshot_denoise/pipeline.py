"""``zeroshot-denoise``: fit a tiny CNN on the scan itself, then denoise every slice.

Compared with plain ZS-N2N (one network per 2D image, 2,000 full-image steps), this version
fits one network per *volume* on random crops of random slices, gives it ``context_slices``
neighbouring slices as extra channels, stops when a fixed evaluation loss plateaus (after one
learning-rate reduction), and runs on CUDA when present.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch

from models.errors import InputRejected
from models.pipelines.zeroshot_denoise.fit import FitConfig, denoise, fit
from models.pipelines.zeroshot_denoise.params import ZeroShotDenoiseParams
from models.provenance import code_version
from models.registry import get_spec
from models.result import Figure, ProgressCallback, Provenance, Result
from models.transforms.figures import before_after_grid, representative_slices
from models.transforms.intensity import Normaliser, display_window
from models.transforms.noise import estimate_noise_std
from models.volume import Volume

_FIT_SHARE = 0.9  # fraction of the progress bar given to fitting


def select_device(choice: str) -> torch.device:
    """Resolve ``"auto" | "cpu" | "cuda"`` to a device; refuse CUDA when absent."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputRejected("device='cuda' requested but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _signal_mask(array: np.ndarray, units: str) -> np.ndarray:
    """Voxels that carry signal (body for CT: > -500 HU; MR: above the 20th percentile)."""
    if units == "HU":
        return np.asarray(array > -500.0)
    return np.asarray(array > np.percentile(array, 20.0))


def _config(params: ZeroShotDenoiseParams, k: int) -> FitConfig:
    return FitConfig(
        context=params.context_slices if k > 1 else 0,
        max_iterations=params.max_iterations,
        min_iterations=min(params.min_iterations, params.max_iterations),
        patience=params.plateau_patience,
        tolerance=params.plateau_tolerance,
        learning_rate=params.learning_rate,
        features=params.features,
        crop_size=params.crop_size,
        batch_size=params.batch_size,
        seed=params.seed,
    )


def run(
    inputs: Mapping[str, Volume], params: ZeroShotDenoiseParams, progress: ProgressCallback
) -> Result:
    """Denoise ``inputs["image"]``.

    Args:
        inputs: ``{"image": Volume}``; array ``(K, H, W)`` in HU for CT or MR units.
        params: Validated parameters.
        progress: ``callback(fraction, step)``; may raise ``Cancelled``.

    Returns:
        Result with ``volumes["denoised"]`` on the input grid (same affine, float32, same
        units), noise estimates before/after (image units, in the signal mask), runtime and a
        before/after/difference figure.
    """
    image = inputs["image"]
    k, h, w = image.shape
    if h < 8 or w < 8:
        raise InputRejected(f"image slices of {h}x{w} pixels are too small to denoise (min 8x8)")
    if not np.all(np.isfinite(image.array)):
        raise InputRejected("image contains NaN or infinite values")
    device = select_device(params.device)
    started = time.perf_counter()
    original = np.asarray(image.array, dtype=np.float32)
    norm = Normaliser.robust(original)
    volume = norm.forward(original)
    cfg = _config(params, k)
    progress(0.0, "fitting")
    net, report = fit(volume, cfg, device, progress, _FIT_SHARE)
    fitted = time.perf_counter()
    out = norm.inverse(
        denoise(net, volume, cfg.context, device, params.inference_batch, progress, _FIT_SHARE)
    )
    elapsed = time.perf_counter() - started
    mask = _signal_mask(original, image.units)
    window = display_window(original, image.units)
    before_sigma = estimate_noise_std(original, mask)
    after_sigma = estimate_noise_std(out, mask)
    removed = original - out
    measurements = {
        "noise_std_before": before_sigma,
        "noise_std_after": after_sigma,
        "noise_estimator": "MAD of finest diagonal Haar detail inside the signal mask",
        "removed_std": float(removed[mask].std()) if mask.any() else 0.0,
        "units": image.units,
        "iterations": report.iterations,
        "stopped_early": report.stopped_early,
        "best_eval_loss": report.best_eval_loss,
        "fit_seconds": fitted - started,
        "runtime_seconds": elapsed,
        "seconds_per_slice": elapsed / k,
        "device": str(device),
        "shape": [k, h, w],
    }
    shown = representative_slices(k)
    figure = Figure(
        "before_after",
        before_after_grid(original, out, shown, window, diff_width=max(6 * before_sigma, 1e-6)),
        f"Rows: slices {shown}; columns: input, denoised, difference (input - denoised). "
        f"Window {window.name}; difference window +/-{3 * before_sigma:.3g} {image.units}.",
    )
    spec = get_spec("zeroshot-denoise")
    provenance = Provenance(
        pipeline=spec.name,
        version=spec.version,
        weights_sha256=spec.weights_sha256(),
        code_version=code_version(),
        parameters=params.model_dump(),
        input_uids=[str(image.meta.get("series_instance_uid", ""))] if image.meta else [],
    )
    denoised = image.with_array(out, meta={**image.meta, "derived_from": "zeroshot-denoise"})
    return Result({"denoised": denoised}, measurements, [figure], provenance)
