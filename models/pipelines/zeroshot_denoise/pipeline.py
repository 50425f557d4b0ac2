"""``zeroshot-denoise``: fit a small CNN on the scan itself, then denoise every slice.

Compared with plain ZS-N2N (one network per 2D image, 2,000 full-image steps), this version
fits one network per *volume* on random crops of random slices with one of two splits (see
``splits``): the slice split (Noise2Noise across slices, immune to in-plane noise correlation,
followed by ``restore``) or the ZS-N2N pair split; fitting stops when a fixed evaluation loss
plateaus, and it runs on CUDA when present.

``domain="sinogram"`` (module ``sinogram_mode``) instead denoises 360 degree projection data by
conjugate-ray flicking and reconstructs it by FBP.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from models.devices import resolve_device
from models.errors import InputRejected
from models.networks.dilated import SmoothedResidualNet
from models.networks.zsn2n import ZSN2NNet
from models.pipelines.zeroshot_denoise.fit import (
    CropSampler,
    FitConfig,
    apply_per_slice,
    train,
)
from models.pipelines.zeroshot_denoise.params import ZeroShotDenoiseParams
from models.pipelines.zeroshot_denoise.restore import restore_detail
from models.pipelines.zeroshot_denoise.sinogram_mode import run_simulated, run_sinogram
from models.pipelines.zeroshot_denoise.splits import (
    context_stack,
    neighbours,
    pair_split_loss,
    pair_split_predict,
    slice_split_loss,
    slice_split_predict,
)
from models.registry import provenance_for
from models.result import Figure, ProgressCallback, Result
from models.sinogram import Sinogram
from models.transforms.figures import before_after_grid, representative_slices
from models.transforms.intensity import Normaliser, display_window
from models.transforms.noise import estimate_noise_std
from models.volume import Volume


def select_device(choice: str) -> torch.device:
    """Resolve ``"auto" | "cpu" | "cuda"`` to a device (:func:`models.devices.resolve_device`)."""
    return torch.device(resolve_device(choice))


def _signal_mask(array: npt.NDArray[np.float32], units: str) -> npt.NDArray[np.bool_]:
    """Voxels that carry signal (CT: > -500 HU, the body; MR: above the 20th percentile)."""
    if units == "HU":
        return np.asarray(array > -500.0)
    return np.asarray(array > np.percentile(array, 20.0))


def _fit_config(params: ZeroShotDenoiseParams) -> FitConfig:
    return FitConfig(
        max_iterations=params.max_iterations,
        min_iterations=min(params.min_iterations, params.max_iterations),
        patience=params.plateau_patience,
        tolerance=params.plateau_tolerance,
        learning_rate=params.learning_rate,
        crop_size=params.crop_size,
        batch_size=params.batch_size,
        seed=params.seed,
    )


_FIT_SHARE = 0.9  # fraction of the progress bar given to fitting; the rest to inference


def _span(progress: ProgressCallback, lo: float, hi: float, step: str) -> Callable[[float], None]:
    """Map a stage-local fraction in [0, 1] onto ``lo..hi`` of the job's progress."""
    return lambda f: progress(lo + (hi - lo) * min(f, 1.0), step)


def choose_method(params: ZeroShotDenoiseParams, n_slices: int, modality: str) -> str:
    """Resolve ``method="auto"``: slice split for CT with 3+ slices, else pair split.

    The slice split needs noise independent between slices (true for CT slices reconstructed
    without overlap) and neighbours that show nearly the same anatomy; MR series are often
    thick 2D slices where neighbours differ too much (measured: it made the shared 3 mm MR
    worse), so ``auto`` keeps them on the pair split.

    Raises:
        InputRejected: ``slice_split`` asked for with fewer than 3 slices.
    """
    if params.method == "slice_split" and n_slices < 3:
        raise InputRejected(f"method=slice_split needs at least 3 slices, the input has {n_slices}")
    if params.method != "auto":
        return params.method
    return "slice_split" if modality == "CT" and n_slices >= 3 else "pair_split"


def denoise_volume(
    volume: npt.NDArray[np.float32],
    params: ZeroShotDenoiseParams,
    method: str,
    device: torch.device,
    progress: ProgressCallback,
) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
    """Denoise a normalised ``(K, H, W)`` volume; return it and the fitting facts.

    ``method="slice_split"`` estimates each slice from its neighbours; ``"pair_split"`` fits the
    ZS-N2N pair split on each slice with its neighbours as extra channels (a single slice gets
    none).
    """
    k = volume.shape[0]
    c = params.context_slices if k > 1 else 0
    torch.manual_seed(params.seed)
    cfg = _fit_config(params)
    if method == "slice_split":
        net: torch.nn.Module = SmoothedResidualNet(2 * c, params.split_features).to(device)
        loss, predict = slice_split_loss, partial(slice_split_predict, net)
        inputs = partial(neighbours, volume, context=c)
    else:
        net = ZSN2NNet(2 * c + 1, 1, params.features).to(device)
        loss, predict = pair_split_loss, partial(pair_split_predict, net)
        inputs = partial(context_stack, volume, context=c)
    sampler = CropSampler(
        partial(context_stack, volume, context=c),
        k,
        volume.shape[1:],
        cfg.crop_size,
        np.random.default_rng(cfg.seed),
    )
    fitting = _span(progress, 0.0, _FIT_SHARE, f"fitting {method.replace('_', ' ')}")
    report = train(net, sampler, loss, cfg, device, lambda f, _it: fitting(f))
    out = apply_per_slice(
        predict,
        inputs,
        k,
        device,
        params.inference_batch,
        _span(progress, _FIT_SHARE, 1.0, "denoising"),
    )
    facts = {
        "method": method,
        "iterations": report.iterations,
        "stopped_early": report.stopped_early,
        "best_eval_loss": report.best_eval_loss,
    }
    return out, facts


def run(
    inputs: Mapping[str, Volume | Sinogram],
    params: ZeroShotDenoiseParams,
    progress: ProgressCallback,
) -> Result:
    """Denoise ``inputs["image"]`` (image domain) or projection data (sinogram domain).

    Args:
        inputs: ``{"image": Volume}``, array ``(K, H, W)`` in HU for CT or MR units; or
            ``{"sinogram": Sinogram}``, line integrals ``(S, n_views, n_det)`` of a 360 degree
            scan (``domain="sinogram"`` only).
        params: Validated parameters.
        progress: ``callback(fraction, step)``; may raise ``Cancelled``.

    Returns:
        Image domain: Result with ``volumes["denoised"]`` on the input grid (same affine,
        float32, same units), noise estimates before/after (image units, in the signal mask),
        runtime and a before/after/difference figure. Sinogram domain: ``volumes["denoised"]``
        (FBP of the flicking-denoised data) and ``volumes["fbp"]`` (plain FBP), see
        :func:`~models.pipelines.zeroshot_denoise.sinogram_mode.run_sinogram` and
        :func:`~models.pipelines.zeroshot_denoise.sinogram_mode.run_simulated`.

    Raises:
        InputRejected: A sinogram with ``domain="image"``; a volume with ``domain="sinogram"``
            but no ``simulate_i0``; and the checks of either domain, before any heavy work.
    """
    if "sinogram" in inputs:
        sinogram = inputs["sinogram"]
        if not isinstance(sinogram, Sinogram):
            raise InputRejected(f"inputs['sinogram'] must be a Sinogram, got {type(sinogram)}")
        if params.domain != "sinogram":
            raise InputRejected(
                "projection data (a sinogram bundle) was given but domain='image' denoises "
                "reconstructed volumes; set domain='sinogram' to denoise the sinogram by "
                "conjugate-ray flicking (needs a 360 degree scan), or give a volume"
            )
        return run_sinogram(sinogram, params, progress)
    if "image" not in inputs:
        raise InputRejected(
            f"zeroshot-denoise needs an 'image' or 'sinogram' input, got {list(inputs)}"
        )
    image = inputs["image"]
    if not isinstance(image, Volume):
        raise InputRejected(f"inputs['image'] must be a Volume, got {type(image)}")
    if params.domain == "sinogram":
        if params.simulate_i0 is None:
            raise InputRejected(
                "domain='sinogram' denoises projection data, but the input is a reconstructed "
                "volume: give a sinogram bundle (geometry JSON + data file, 360 degree scan) "
                "or set simulate_i0 to simulate a low-dose scan of this CT volume"
            )
        return run_simulated(image, params, progress)
    k, h, w = image.shape
    if h < 8 or w < 8:
        raise InputRejected(f"image slices of {h}x{w} pixels are too small to denoise (min 8x8)")
    if not np.all(np.isfinite(image.array)):
        raise InputRejected("image contains NaN or infinite values")
    device = select_device(params.device)
    started = time.perf_counter()
    original = np.asarray(image.array, dtype=np.float32)
    norm = Normaliser.robust(original)
    progress(0.0, "fitting")
    method = choose_method(params, k, image.modality)
    out_n, facts = denoise_volume(norm.forward(original), params, method, device, progress)
    out = norm.inverse(out_n)
    if method == "slice_split" and params.restore_detail:
        out, facts["restored_fraction"] = restore_detail(original, out)
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
        **facts,
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
    provenance = provenance_for("zeroshot-denoise", params, image)
    denoised = image.with_array(out, meta={**image.meta, "derived_from": "zeroshot-denoise"})
    return Result({"denoised": denoised}, measurements, [figure], provenance)
