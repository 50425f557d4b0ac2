"""``sparse-view-ct``: a simulated fan-beam sparse-view scan of a CT volume, reconstructed.

Simulation mode (input (b) of the issue): each slice of the full-dose CT is the ground truth of
a 360 degree fan-beam scan of ``views`` source positions with Poisson noise, reconstructed with
FBP, SIRT, CGLS or TV. The input is therefore also the reference of the reported PSNR/SSIM.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from models.errors import InputRejected
from models.physics.lowdose import BODY_THRESHOLD_HU, estimate_body_mask, mu_to_hu
from models.physics.projector import make_projector
from models.pipelines.sparse_view_ct.acquisition import (
    build_geometry,
    check_input,
    geometry_facts,
    pad_square,
    simulate,
)
from models.pipelines.sparse_view_ct.metrics import HU_WINDOW, psnr_db, ssim_in_mask
from models.pipelines.sparse_view_ct.params import SparseViewCTParams
from models.pipelines.sparse_view_ct.reconstruct import reconstruct_slice, residuals
from models.registry import provenance_for
from models.result import Figure, ProgressCallback, Result
from models.transforms.figures import representative_slices
from models.transforms.intensity import display_window
from models.volume import Volume

_CHUNK = 8
"""Slices simulated and reconstructed together (bounds the memory of the sinograms)."""


def _device(choice: str) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputRejected("device='cuda' requested but no CUDA device is available")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def _comparison_figure(
    reference: npt.NDArray[np.float32],
    fbp: npt.NDArray[np.float32],
    result: npt.NDArray[np.float32],
    method: str,
    views: int,
) -> Figure:
    """``reference | FBP | result`` of the middle representative slice, soft-tissue window."""
    k = representative_slices(reference.shape[0], count=1)[0]
    window = display_window(reference, "HU")
    panels = [window.to_uint8(a[k]) for a in (reference, fbp, result)]
    grey = np.concatenate(panels, axis=1)
    return Figure(
        "comparison",
        np.repeat(grey[..., None], 3, axis=2),
        f"Slice {k}: input (reference) | FBP from {views} views | {method} from {views} views; "
        f"window {window.name}; rows down, columns right as stored.",
    )


def _quality(
    reference: npt.NDArray[np.float32],
    images: Mapping[str, npt.NDArray[np.float32]],
) -> dict[str, Any]:
    mask = estimate_body_mask(reference)
    out: dict[str, Any] = {
        "metric_reference": "the input volume (simulation mode: it is the ground truth)",
        "metric_mask": f"body: largest region > {BODY_THRESHOLD_HU:g} HU per slice, holes filled",
        "metric_window_hu": list(HU_WINDOW),
        "body_fraction": float(mask.mean()),
    }
    for name, image in images.items():
        out[f"{name}_psnr_db"] = psnr_db(image, reference, mask)
        out[f"{name}_ssim"] = ssim_in_mask(image, reference, mask)
    return out


def run(
    inputs: Mapping[str, Volume], params: SparseViewCTParams, progress: ProgressCallback
) -> Result:
    """Simulate a sparse-view fan-beam scan of ``inputs["image"]`` and reconstruct it.

    Args:
        inputs: ``{"image": Volume}``: CT, array ``(K, H, W)`` in HU, square pixels (mm).
        params: Validated parameters.
        progress: ``callback(fraction, step)``; may raise ``Cancelled``.

    Returns:
        Result with ``volumes["reconstruction"]`` (HU, float32, same grid, affine and frame of
        reference as the input; padding and air outside the body come back as about -1000 HU),
        measurements (method, views, geometry, per-slice and mean residual
        ``||Ax - y|| / ||y||`` of the result and of FBP, PSNR/SSIM of both against the input in
        the body mask with the HU window, runtimes) and a reference | FBP | result figure.

    Raises:
        InputRejected: Non-CT input, NaN, tiny slices, non-square pixels or a geometry that
            cannot cover the slice, before any projection.
    """
    image = inputs["image"]
    pixel_mm = check_input(image)
    reference = np.asarray(image.array, dtype=np.float32)
    padded, rows, cols = pad_square(reference)
    geometry = build_geometry(padded.shape[-1], pixel_mm, params)
    device = _device(params.device)
    started = time.perf_counter()
    progress(0.0, "simulating the scan")
    projector = make_projector(geometry, "torch", device)
    rng = np.random.default_rng(params.seed)
    fbp_mu = np.empty(padded.shape, dtype=np.float32)
    result_mu = np.empty(padded.shape, dtype=np.float32)
    fbp_res: list[float] = []
    result_res: list[float] = []
    fbp_seconds = 0.0
    n_slices = padded.shape[0]
    for lo in range(0, n_slices, _CHUNK):  # bounded memory: sinograms of one chunk at a time
        part = slice(lo, min(lo + _CHUNK, n_slices))
        sinograms = simulate(padded[part], projector, params.i0, rng)
        t_fbp = time.perf_counter()
        fbp_mu[part] = projector.fbp(sinograms, params.filter_name)
        fbp_seconds += time.perf_counter() - t_fbp
        fbp_res += residuals(fbp_mu[part], sinograms, projector)
        for i, sino in enumerate(sinograms):
            k = lo + i
            if params.method == "fbp":
                result_mu[k], residual = fbp_mu[k], fbp_res[k]
            else:

                def step(f: float, k: int = k) -> None:
                    progress((k + f) / n_slices, params.method)

                result_mu[k], residual = reconstruct_slice(sino, projector, params, step)
            result_res.append(residual)
            progress((k + 1) / n_slices, params.method)
    elapsed = time.perf_counter() - started
    out_hu = mu_to_hu(result_mu)[:, rows, cols]
    fbp_hu = mu_to_hu(fbp_mu)[:, rows, cols]
    k, h, w = image.shape
    measurements: dict[str, Any] = {
        "method": params.method,
        "views": params.views,
        "iterations": params.resolved_iterations(),
        "filter": params.filter_name,
        "tv_weight": params.tv_weight if params.method == "tv" else None,
        "i0": params.i0,
        "seed": params.seed,
        "geometry": geometry_facts(geometry),
        "residual_definition": "||A x - y|| / ||y||, noisy simulated data y, same projector A",
        "residual_per_slice": [float(r) for r in result_res],
        "residual_mean": float(np.mean(result_res)),
        "fbp_residual_per_slice": [float(r) for r in fbp_res],
        "fbp_residual_mean": float(np.mean(fbp_res)),
        **_quality(reference, {"result": out_hu, "fbp": fbp_hu}),
        "units": "HU",
        "runtime_seconds": elapsed,
        "seconds_per_slice": elapsed / k,
        "fbp_seconds": fbp_seconds,
        "device": device,
        "shape": [k, h, w],
    }
    for key in ("result_psnr_db", "fbp_psnr_db", "result_ssim", "fbp_ssim"):
        if not math.isfinite(measurements[key]):
            measurements[key] = None  # JSON has no inf/nan (empty body mask or exact match)
    figure = _comparison_figure(reference, fbp_hu, out_hu, params.method, params.views)
    provenance = provenance_for("sparse-view-ct", params, image)
    meta = {**image.meta, "derived_from": "sparse-view-ct"}
    volume = image.with_array(out_hu.astype(np.float32), meta=meta)
    progress(1.0, "done")
    return Result({"reconstruction": volume}, measurements, [figure], provenance)
