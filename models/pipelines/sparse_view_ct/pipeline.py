"""``sparse-view-ct``: sparse-view CT reconstruction from three kinds of input.

* (a) projection data (``inputs["sinogram"]``): :mod:`.measured`.
* (b) a full-dose CT (``input_kind="full-dose-ct"``): each slice is the ground truth of a
  simulated 360 degree fan-beam scan of ``views`` source positions with Poisson noise,
  reconstructed with FBP, SIRT, CGLS, TV or the learned network (FBP, then the network); the
  input is therefore also the reference of the reported PSNR/SSIM.
* (c) a sparse-view FBP series (``input_kind="sparse-view-fbp"``): post-processed by the
  learned network; no reference exists, so no PSNR is reported.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from models.devices import resolve_device
from models.errors import InputRejected
from models.physics.lowdose import hu_to_mu, mu_to_hu
from models.physics.projector import make_projector
from models.pipelines.ct_simulation import quality_against_input
from models.pipelines.sparse_view_ct.acquisition import (
    build_geometry,
    check_input,
    geometry_facts,
    pad_square,
    simulate,
)
from models.pipelines.sparse_view_ct.learned import MODELS_DIR, load_network, postprocess
from models.pipelines.sparse_view_ct.measured import run_measured
from models.pipelines.sparse_view_ct.params import (
    LEARNED_WEIGHTS,
    SparseViewCTParams,
    resolve_method,
)
from models.pipelines.sparse_view_ct.reconstruct import reconstruct_slice, refine_slice, residuals
from models.registry import provenance_for
from models.result import Figure, ProgressCallback, Result
from models.sinogram import Sinogram
from models.transforms.figures import representative_slices
from models.transforms.intensity import display_window
from models.volume import Volume

_CHUNK = 8
"""Slices simulated and reconstructed together (bounds the memory of the sinograms)."""


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


def _dc_facts(params: SparseViewCTParams) -> dict[str, Any]:
    """What the data-consistency step of ``learned`` did (``result.json``)."""
    if params.data_consistency == "none":
        return {"method": "none", "note": "the result is the network output"}
    return {
        "method": "tv",
        "iterations": params.dc_iterations,
        "tv_weight": params.dc_tv_weight,
        "anchor_weight": params.dc_anchor_weight,
        "objective": "1/2 ||A x - y||^2 + lambda TV(x) + mu/2 ||x - x_net||^2, x >= 0; "
        "lambda = tv_weight mean(A^T 1), mu = anchor_weight mean(A^T A 1); started at x_net",
        "note": "network_psnr_db / network_ssim: the network output before this step",
    }


def _network(device: str) -> Any:
    if LEARNED_WEIGHTS is None:  # params validation refuses 'learned' before this
        raise InputRejected("method 'learned' has no shipped weights")
    return load_network(MODELS_DIR / LEARNED_WEIGHTS, device)


def run(
    inputs: Mapping[str, Volume | Sinogram], params: SparseViewCTParams, progress: ProgressCallback
) -> Result:
    """Reconstruct a sparse-view scan from ``inputs`` (see the module docstring).

    ``inputs["sinogram"]`` goes to :func:`.measured.run_measured`;
    ``input_kind="sparse-view-fbp"`` to :func:`run_postprocess`; otherwise
    :func:`run_simulated`.
    """
    device = resolve_device(params.device)
    method = resolve_method(params.method, "sinogram" in inputs)
    if method != params.method:  # "auto": the stamped parameters name the method that ran
        params = params.model_copy(update={"method": method})
    if "sinogram" in inputs:
        sinogram = inputs["sinogram"]
        if not isinstance(sinogram, Sinogram):
            raise InputRejected("inputs['sinogram'] must be a Sinogram")
        return run_measured(sinogram, params, progress, device)
    image = inputs.get("image")
    if not isinstance(image, Volume):
        raise InputRejected("sparse-view-ct needs an image volume or a sinogram bundle")
    if params.input_kind == "sparse-view-fbp":
        return run_postprocess(image, params, progress, device)
    return run_simulated(image, params, progress, device)


def run_postprocess(
    image: Volume, params: SparseViewCTParams, progress: ProgressCallback, device: str
) -> Result:
    """Input (c): the learned network on an FBP series made from ``params.views`` views.

    Args:
        image: CT, ``(K, H, W)`` HU, the sparse-view FBP slices.
        params: ``method`` must be ``learned``; ``views`` conditions the network.
        progress: ``callback(fraction, step)``.
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        Result with ``volumes["reconstruction"]`` (HU, the input's grid, affine and frame of
        reference), runtime and a input | result figure; no PSNR (there is no reference).

    Raises:
        InputRejected: A method other than ``learned``, an explicit ``data_consistency="tv"``
            (there is no sinogram to be consistent with), non-CT input.
    """
    if params.method != "learned":
        raise InputRejected(
            f"input_kind 'sparse-view-fbp' is post-processed by method 'learned' only (fbp, "
            f"sirt, cgls and tv need projection data), got {params.method!r}"
        )
    if params.data_consistency == "tv" and "data_consistency" in params.model_fields_set:
        raise InputRejected(
            "data_consistency 'tv' needs projection data, and an FBP series has none: use "
            "data_consistency 'none', or give the full-dose CT (input_kind full-dose-ct) or the "
            "sinogram"
        )
    check_input(image)
    started = time.perf_counter()
    net = _network(device)
    array = np.asarray(image.array, dtype=np.float32)
    out = postprocess(array, params.views, net, progress=lambda f: progress(f, "learned"))
    elapsed = time.perf_counter() - started
    k, h, w = image.shape
    measurements: dict[str, Any] = {
        "input": "sparse-view FBP series",
        "method": "learned",
        "views": params.views,
        "weights": LEARNED_WEIGHTS,
        "data_consistency": {
            "method": "none",
            "note": "an FBP series carries no projection data: the result is the network output",
        },
        "units": "HU",
        "runtime_seconds": elapsed,
        "seconds_per_slice": elapsed / k,
        "device": device,
        "shape": [k, h, w],
        "note": "no reference image: quality figures need a simulation (input_kind "
        "full-dose-ct) or projection data",
    }
    window = display_window(array, "HU")
    mid = representative_slices(k, count=1)[0]
    grey = np.concatenate([window.to_uint8(array[mid]), window.to_uint8(out[mid])], axis=1)
    figure = Figure(
        "comparison",
        np.repeat(grey[..., None], 3, axis=2),
        f"Slice {mid}: input FBP ({params.views} views) | learned; window {window.name}.",
    )
    meta = {**image.meta, "derived_from": "sparse-view-ct"}
    volume = image.with_array(out.astype(np.float32), meta=meta)
    progress(1.0, "done")
    return Result(
        {"reconstruction": volume},
        measurements,
        [figure],
        provenance_for("sparse-view-ct", params, image),
    )


def run_simulated(
    image: Volume, params: SparseViewCTParams, progress: ProgressCallback, device: str
) -> Result:
    """Input (b): simulate a sparse-view fan-beam scan of ``image`` and reconstruct it.

    Args:
        image: CT, array ``(K, H, W)`` in HU, square pixels (mm).
        params: Validated parameters.
        progress: ``callback(fraction, step)``; may raise ``Cancelled``.
        device: ``"cpu"`` or ``"cuda"``.

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
    pixel_mm = check_input(image)
    reference = np.asarray(image.array, dtype=np.float32)
    padded, rows, cols = pad_square(reference)
    geometry = build_geometry(padded.shape[-1], pixel_mm, params)
    net = _network(device) if params.method == "learned" else None
    started = time.perf_counter()
    progress(0.0, "simulating the scan")
    projector = make_projector(geometry, "torch", device)
    rng = np.random.default_rng(params.seed)
    fbp_mu = np.empty(padded.shape, dtype=np.float32)
    result_mu = np.empty(padded.shape, dtype=np.float32)
    # the network's own output, kept to report its quality before the data-consistency step
    network_mu = np.empty(padded.shape if net is not None else (0, 0, 0), dtype=np.float32)
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

                if net is None:
                    result_mu[k], residual = reconstruct_slice(sino, projector, params, step)
                else:
                    corrected = postprocess(mu_to_hu(fbp_mu[k : k + 1]), params.views, net)
                    network_mu[k] = hu_to_mu(corrected)[0]
                    if params.data_consistency == "tv":
                        result_mu[k], residual = refine_slice(
                            sino, projector, network_mu[k], params, step
                        )
                    else:
                        result_mu[k] = network_mu[k]
                        residual = residuals(result_mu[k : k + 1], sino[None], projector)[0]
            result_res.append(residual)
            progress((k + 1) / n_slices, params.method)
    elapsed = time.perf_counter() - started
    out_hu = mu_to_hu(result_mu)[:, rows, cols]
    fbp_hu = mu_to_hu(fbp_mu)[:, rows, cols]
    k, h, w = image.shape
    compared = {"result": out_hu, "fbp": fbp_hu}
    learned_facts: dict[str, Any] = {}
    if net is not None:
        compared["network"] = mu_to_hu(network_mu)[:, rows, cols]
        learned_facts = {"data_consistency": _dc_facts(params)}
    measurements: dict[str, Any] = {
        "input": "full-dose CT (simulated sparse-view scan)",
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
        **learned_facts,
        **quality_against_input(reference, compared),
        "units": "HU",
        "runtime_seconds": elapsed,
        "seconds_per_slice": elapsed / k,
        "fbp_seconds": fbp_seconds,
        "device": device,
        "shape": [k, h, w],
    }
    figure = _comparison_figure(reference, fbp_hu, out_hu, params.method, params.views)
    provenance = provenance_for("sparse-view-ct", params, image)
    meta = {**image.meta, "derived_from": "sparse-view-ct"}
    volume = image.with_array(out_hu.astype(np.float32), meta=meta)
    progress(1.0, "done")
    return Result({"reconstruction": volume}, measurements, [figure], provenance)
