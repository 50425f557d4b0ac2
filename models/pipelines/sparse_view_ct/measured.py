"""``sparse-view-ct`` on projection data (input (a)): reconstruct a :class:`Sinogram`.

The sinogram's geometry (parallel or fan beam, as its JSON described it, already normalised by
:func:`models.sinogram.normalise_projections`) defines the ``N x N`` image grid. With
``view_stride = k > 1`` only every ``k``-th view is used (a retrospective sparse-view scan of the
real data) and the FBP from all views is the reference of PSNR/SSIM, so a user sees what the
sparse scan lost, measured on their own data.

Output frame: projection data carry no patient orientation, so the volume is in the scanner
frame: columns along +x, rows along +y of :mod:`models.physics.geometry`, slices along +z at
``slice_spacing_mm``, centred on the rotation axis; the affine writes that frame as if it were
LPS and ``meta["frame"]`` says so. Units: HU for ``modality == "CT"`` (water at the JSON's
``mu_water_per_mm``), else linear attenuation in 1/mm.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from models.errors import InputRejected
from models.physics.lowdose import estimate_body_mask, mu_to_hu
from models.physics.projector import make_projector
from models.pipelines.sparse_view_ct.acquisition import geometry_facts
from models.pipelines.sparse_view_ct.metrics import HU_WINDOW, psnr_db, ssim_in_mask
from models.pipelines.sparse_view_ct.params import SparseViewCTParams
from models.pipelines.sparse_view_ct.reconstruct import reconstruct_slice, residuals
from models.registry import provenance_for
from models.result import Figure, ProgressCallback, Result
from models.sinogram import Sinogram
from models.transforms.intensity import display_window
from models.volume import Volume

_CHUNK = 8
"""Slices reconstructed together."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, min(n, 64) + 1) if n % d == 0]


def check_measured(sinogram: Sinogram, params: SparseViewCTParams) -> None:
    """Refuse what cannot run on projection data, before any work.

    Raises:
        InputRejected: ``learned`` (trained on simulated clinical fan-beam CT images only), a
            ``view_stride`` that does not divide the views or leaves fewer than 4.
    """
    if params.method == "learned":
        raise InputRejected(
            "method 'learned' post-processes FBP images of the simulated clinical fan-beam CT "
            "it was trained on, not arbitrary projection data; use fbp, sirt, cgls or tv"
        )
    n, k = sinogram.geometry.n_views, params.view_stride
    if k > 1 and (n % k or n // k < 4):
        raise InputRejected(
            f"view_stride={k} must divide the {n} views and leave at least 4 (equally spaced "
            f"views only); strides that divide {n}: {_divisors(n) or 'none'}"
        )


def _affine(n: int, pixel_mm: float, slice_mm: float) -> npt.NDArray[np.float64]:
    half = (n - 1) / 2.0 * pixel_mm
    return np.array(
        [
            [0.0, 0.0, pixel_mm, -half],
            [0.0, pixel_mm, 0.0, -half],
            [slice_mm, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def _fov_mask(shape: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    n = shape[-1]
    r = (np.arange(n) - (n - 1) / 2.0) / (n / 2.0)
    disk = (r[None, :] ** 2 + r[:, None] ** 2) <= 1.0
    return np.broadcast_to(disk, shape).copy()


def _quality(
    reference: npt.NDArray[np.float32], images: dict[str, npt.NDArray[np.float32]], hu: bool
) -> dict[str, Any]:
    if hu:
        mask, window = estimate_body_mask(reference), HU_WINDOW
        mask_text = "body mask of the all-view FBP"
    else:
        mask = _fov_mask(reference.shape)
        lo, hi = np.percentile(reference[mask], [0.5, 99.5])
        window = (float(lo), float(hi) if hi > lo else float(lo) + 1e-6)
        mask_text = "disk inscribed in the image (reconstructed field of view)"
    out: dict[str, Any] = {
        "metric_reference": "FBP from all views of the input (real data: no ground truth)",
        "metric_mask": mask_text,
        "metric_window": list(window),
    }
    for name, image in images.items():
        psnr = psnr_db(image, reference, mask, window)
        ssim = ssim_in_mask(image, reference, mask, window)
        out[f"{name}_psnr_db"] = psnr if math.isfinite(psnr) else None
        out[f"{name}_ssim"] = ssim if math.isfinite(ssim) else None
    return out


def _figure(panels: dict[str, npt.NDArray[np.float32]], units: str) -> Figure:
    k = panels["fbp"].shape[0] // 2
    first = next(iter(panels.values()))
    window = display_window(first, units)
    grey = np.concatenate([window.to_uint8(a[k]) for a in panels.values()], axis=1)
    return Figure(
        "comparison",
        np.repeat(grey[..., None], 3, axis=2),
        f"Slice {k}: {' | '.join(panels)}; window {window.name}; rows +y, columns +x of the "
        "scanner frame.",
    )


def run_measured(
    sinogram: Sinogram, params: SparseViewCTParams, progress: ProgressCallback, device: str
) -> Result:
    """Reconstruct ``sinogram`` with ``params.method`` (see the module docstring).

    Args:
        sinogram: Normalised line integrals ``(S, n_views, n_det)`` with their geometry.
        params: Validated parameters (method, iterations, filter, tv_weight, view_stride).
        progress: ``callback(fraction, step)``; may raise ``Cancelled``.
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        Result with ``volumes["reconstruction"]`` ``(S, N, N)`` float32 (HU or 1/mm), and
        measurements: method, views used, geometry, per-slice and mean residual
        ``||Ax - y|| / ||y||`` of the result and of FBP (on the views used), runtimes, the
        normalisation facts of the input, and with ``view_stride > 1`` PSNR/SSIM of FBP and
        the result against the all-view FBP.
    """
    check_measured(sinogram, params)
    full_geo = sinogram.geometry
    stride = params.view_stride
    geometry = dataclasses.replace(full_geo, n_views=full_geo.n_views // stride)
    hu = sinogram.modality == "CT"
    units = "HU" if hu else "1/mm"
    started = time.perf_counter()
    projector = make_projector(geometry, "torch", device)
    full_projector = make_projector(full_geo, "torch", device) if stride > 1 else None
    s, n = sinogram.n_slices, geometry.image_size
    fbp_mu = np.empty((s, n, n), dtype=np.float32)
    result_mu = np.empty((s, n, n), dtype=np.float32)
    reference_mu = np.empty((s, n, n), dtype=np.float32) if full_projector else None
    fbp_res: list[float] = []
    result_res: list[float] = []
    for lo in range(0, s, _CHUNK):
        part = slice(lo, min(lo + _CHUNK, s))
        data = np.ascontiguousarray(sinogram.data[part, ::stride])
        fbp_mu[part] = projector.fbp(data, params.filter_name)
        if full_projector is not None and reference_mu is not None:
            reference_mu[part] = full_projector.fbp(sinogram.data[part], params.filter_name)
        fbp_res += residuals(fbp_mu[part], data, projector)
        for i, sino in enumerate(data):
            k = lo + i
            if params.method == "fbp":
                result_mu[k], residual = fbp_mu[k], fbp_res[k]
            else:

                def step(f: float, k: int = k) -> None:
                    progress((k + f) / s, params.method)

                result_mu[k], residual = reconstruct_slice(sino, projector, params, step)
            result_res.append(residual)
            progress((k + 1) / s, params.method)
    elapsed = time.perf_counter() - started

    def to_units(mu: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return mu_to_hu(mu, sinogram.mu_water_per_mm) if hu else mu

    result, fbp = to_units(result_mu), to_units(fbp_mu)
    measurements: dict[str, Any] = {
        "input": "sinogram",
        "method": params.method,
        "views_in_data": full_geo.n_views,
        "view_stride": stride,
        "views": geometry.n_views,
        "iterations": params.resolved_iterations(),
        "filter": params.filter_name,
        "tv_weight": params.tv_weight if params.method == "tv" else None,
        "geometry": geometry_facts(geometry),
        "normalisation": dict(sinogram.meta),
        "residual_definition": "||A x - y|| / ||y||, the input's line integrals y (views used)",
        "residual_per_slice": result_res,
        "residual_mean": float(np.mean(result_res)),
        "fbp_residual_per_slice": fbp_res,
        "fbp_residual_mean": float(np.mean(fbp_res)),
        "units": units,
        "runtime_seconds": elapsed,
        "seconds_per_slice": elapsed / s,
        "device": device,
        "shape": [s, n, n],
    }
    panels: dict[str, npt.NDArray[np.float32]] = {"fbp": fbp, str(params.method): result}
    if reference_mu is not None:
        reference = to_units(reference_mu)
        measurements.update(_quality(reference, {"result": result, "fbp": fbp}, hu))
        panels = {f"all {full_geo.n_views} views FBP": reference, **panels}
    meta = {
        "derived_from": "sparse-view-ct",
        "frame": "scanner frame of the projection data (no patient orientation): columns +x, "
        "rows +y, slices +z, centred on the rotation axis",
        "source_file": sinogram.meta.get("source_file", ""),
    }
    volume = Volume(
        result.astype(np.float32),
        _affine(n, geometry.pixel_size_mm, sinogram.slice_spacing_mm),
        modality=sinogram.modality,
        units=units,
        meta=meta,
    )
    provenance = provenance_for("sparse-view-ct", params, sinogram)
    progress(1.0, "done")
    return Result({"reconstruction": volume}, measurements, [_figure(panels, units)], provenance)
