"""``zeroshot-denoise`` with ``domain="sinogram"``: flicking per slice, then FBP.

Two inputs lead here (see :func:`run_sinogram` and :func:`run_simulated`):

* a :class:`~models.sinogram.Sinogram` read from a bundle (line integrals ``(S, n_views,
  n_det)`` of a 360 degree parallel- or fan-beam scan). The outputs lie on the geometry's
  ``N x N`` grid centred on the rotation axis, in the *scanner* frame: projection data carry
  no patient orientation, and the output volumes say so in ``meta["frame"]``;
* a CT volume in HU with ``simulate_i0`` set (research/QA): each slice, padded square with air,
  is the truth of a simulated 360 degree fan-beam scan with Poisson noise (one generator seeded
  with ``seed``, slices in order). The outputs are cropped back onto the input grid (same
  affine and frame of reference), labelled simulated, and PSNR/SSIM against the input are
  reported.

Each slice's sinogram is denoised by conjugate-ray flicking
(:func:`~models.pipelines.zeroshot_denoise.sinogram.denoise_sinogram`, one network fitted per
slice) and reconstructed by FBP; the FBP of the noisy sinogram is returned next to it
(``volumes["fbp"]``) so that users can compare.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from models.devices import resolve_device
from models.errors import InputRejected
from models.physics.conjugate import ConjugateMap, conjugate_map, require_full_scan
from models.physics.fan_geometry import FanBeamGeometry
from models.physics.iterative import data_residual
from models.physics.lowdose import (
    DETECTOR_BINS_PER_PIXEL,
    MU_WATER_PER_MM,
    estimate_body_mask,
    hu_to_mu,
    mu_to_hu,
    noisy_line_integrals,
)
from models.physics.projector import Projector, make_projector
from models.pipelines.ct_simulation import check_ct_volume, quality_against_input
from models.pipelines.sparse_view_ct.metrics import psnr_db
from models.pipelines.zeroshot_denoise.params import ZeroShotDenoiseParams
from models.pipelines.zeroshot_denoise.sinogram import (
    LOW_FREQUENCY_SIGMA,
    FlickingConfig,
    denoise_sinogram,
)
from models.registry import provenance_for
from models.result import Figure, ProgressCallback, Result
from models.sinogram import Geometry, Sinogram
from models.transforms.figures import representative_slices
from models.transforms.intensity import Window, display_window
from models.volume import Volume

AIR_HU = -1000.0
"""Padding (HU) that makes a slice square before its scan is simulated."""

SCANNER_FRAME = (
    "scanner frame: projection data carry no patient orientation. Columns run along +x, rows "
    "along +y of the reconstruction frame (x = the first view's detector axis), slices along "
    "+z; origin at the rotation axis, volume centred on it. The LPS labels of this file are "
    "nominal, not the patient's"
)
"""``meta["frame"]`` of the output volumes of a sinogram bundle."""


def flicking_config(params: ZeroShotDenoiseParams) -> FlickingConfig:
    """The :class:`FlickingConfig` of the parameters (optimiser settings and ``flicking_*``)."""
    return FlickingConfig(
        copies=params.flicking_copies,
        max_iterations=params.max_iterations,
        min_iterations=min(params.min_iterations, params.max_iterations),
        patience=params.plateau_patience,
        learning_rate=params.learning_rate,
        features=params.features,
        crop_size=params.crop_size,
        batch_size=params.batch_size,
        ensemble=params.flicking_ensemble,
        seed=params.seed,
    )


def geometry_facts(geometry: Geometry) -> dict[str, Any]:
    """JSON-ready description of a scan (mm, degrees)."""
    facts: dict[str, Any] = {
        "beam": "fan" if isinstance(geometry, FanBeamGeometry) else "parallel",
        "views": geometry.n_views,
        "arc_deg": geometry.arc_deg,
        "n_detectors": geometry.n_det,
        "detector_spacing_mm": geometry.det_spacing_mm,
        "image_size": geometry.image_size,
        "pixel_size_mm": geometry.pixel_size_mm,
    }
    if isinstance(geometry, FanBeamGeometry):
        facts["detector"] = geometry.detector
        facts["source_to_isocentre_mm"] = geometry.source_to_isocentre_mm
        facts["source_to_detector_mm"] = geometry.source_to_detector_mm
        facts["fan_angle_deg"] = 2.0 * math.degrees(geometry.max_fan_angle_rad)
    return facts


def check_sinogram(sinogram: Sinogram) -> ConjugateMap:
    """Refuse what flicking cannot use, before any fitting; return the conjugate map.

    Raises:
        InputRejected: Less than a full 360 degree scan (flicking needs every ray measured
            twice), non-finite values, or an image grid under 8 x 8 pixels.
    """
    require_full_scan(sinogram.geometry.arc_deg)
    if not np.all(np.isfinite(sinogram.data)):
        raise InputRejected("sinogram contains NaN or infinite values")
    if sinogram.geometry.image_size < 8:
        raise InputRejected(
            f"reconstruction grid of {sinogram.geometry.image_size} pixels is too small (min 8)"
        )
    return conjugate_map(sinogram.geometry)


@dataclass(frozen=True)
class Reconstructions:
    """FBP of the noisy and of the flicking-denoised sinograms, and the facts of the fits.

    Attributes:
        fbp_mu: FBP of the noisy data, attenuation (1/mm), ``(S, N, N)``.
        flicking_mu: FBP of the denoised data, attenuation (1/mm), ``(S, N, N)``.
        facts: Per-slice iterations, residuals ``||A x - y|| / ||y||`` (noisy ``y``), seconds.
    """

    fbp_mu: npt.NDArray[np.float32]
    flicking_mu: npt.NDArray[np.float32]
    facts: dict[str, Any]


def reconstruct(
    sinogram: Sinogram,
    cmap: ConjugateMap,
    params: ZeroShotDenoiseParams,
    projector: Projector,
    progress: ProgressCallback,
    share: tuple[float, float] = (0.0, 1.0),
) -> Reconstructions:
    """Flicking-denoise and FBP every slice of ``sinogram``; FBP the noisy data too.

    Args:
        sinogram: Line integrals ``(S, n_views, n_det)`` of a checked 360 degree scan.
        cmap: Its conjugate map (:func:`check_sinogram`).
        params: Validated parameters (flicking settings, ``filter_name``, ``device``).
        projector: Projector of ``sinogram.geometry`` (FBP and residuals).
        progress: ``callback(fraction, step)`` of the job; may raise ``Cancelled``.
        share: Part ``(lo, hi)`` of the job's progress bar this stage fills.

    Returns:
        The two reconstructions (1/mm, ``(S, N, N)``) and the fitting facts.
    """
    cfg = flicking_config(params)
    device = resolve_device(params.device)
    n = sinogram.n_slices
    size = sinogram.geometry.image_size
    fbp_mu = np.empty((n, size, size), dtype=np.float32)
    flick_mu = np.empty((n, size, size), dtype=np.float32)
    iterations: list[int] = []
    stopped: list[bool] = []
    fbp_res: list[float] = []
    flick_res: list[float] = []
    fit_seconds = 0.0
    lo, hi = share
    for k, noisy in enumerate(sinogram.data):

        def step(f: float, k: int = k) -> None:
            progress(lo + (hi - lo) * (k + min(f, 1.0)) / n, f"flicking slice {k + 1}/{n}")

        step(0.0)
        denoised, facts = denoise_sinogram(noisy, cmap, cfg, device, step)
        fit_seconds += facts["seconds"]
        iterations.append(int(facts["iterations"]))
        stopped.append(bool(facts["stopped_early"]))
        both = projector.fbp(np.stack([noisy, denoised]), params.filter_name)
        fbp_mu[k], flick_mu[k] = both[0], both[1]
        fbp_res.append(data_residual(fbp_mu[k], noisy, projector))
        flick_res.append(data_residual(flick_mu[k], noisy, projector))
        step(1.0)
    facts_out: dict[str, Any] = {
        "flicking": {
            **asdict(cfg),
            "network": "ZS-N2N 3-layer CNN predicting the noise, one fit per slice",
            "low_frequency_sigma": LOW_FREQUENCY_SIGMA,
        },
        "flicking_iterations_per_slice": iterations,
        "flicking_stopped_early_per_slice": stopped,
        "flicking_fit_seconds": fit_seconds,
        "conjugate_exact": cmap.exact,
        "conjugate_fraction": float(cmap.valid.mean()),
        "filter": params.filter_name,
        "residual_definition": "||A x - y|| / ||y||, noisy data y, the scan's projector A",
        "fbp_residual_per_slice": fbp_res,
        "fbp_residual_mean": float(np.mean(fbp_res)),
        "flicking_residual_per_slice": flick_res,
        "flicking_residual_mean": float(np.mean(flick_res)),
        "device": device,
    }
    return Reconstructions(fbp_mu, flick_mu, facts_out)


def _comparison_figure(
    images: Mapping[str, npt.NDArray[np.float32]], units: str, simulated: bool
) -> Figure:
    """Rows of representative slices: the images side by side, then FBP - flicking."""
    fbp, flick = images["fbp"], images["flicking"]
    shown = representative_slices(fbp.shape[0])
    window = Window(40.0, 400.0, "soft tissue L40/W400 HU") if units == "HU" else None
    window = window or display_window(fbp, units)
    diff = fbp - flick
    width = max(6.0 * float(np.std(diff)), 1e-6)
    diff_window = Window(0.0, width, "difference")
    rows = []
    for k in shown:
        panels = [window.to_uint8(a[k]) for a in images.values()]
        panels.append(diff_window.to_uint8(diff[k]))
        rows.append(np.concatenate(panels, axis=1))
    grey = np.concatenate(rows, axis=0)
    columns = ", ".join(images) + ", difference (fbp - flicking)"
    source = "a simulated low-dose scan of the input" if simulated else "the given data"
    return Figure(
        "comparison",
        np.repeat(grey[..., None], 3, axis=2),
        f"Rows: slices {shown}; columns: {columns}; fbp and flicking reconstruct {source}. "
        f"Window {window.name}; "
        f"difference window +/-{width / 2:.3g} {units}; rows down, columns right as stored.",
    )


def _noise_only(
    noise_free_hu: npt.NDArray[np.float32],
    reference_hu: npt.NDArray[np.float32],
    images: Mapping[str, npt.NDArray[np.float32]],
) -> dict[str, Any]:
    """PSNR against the noise-free FBP (quantum noise only, as benchmarks/sinogram_flicking)."""
    mask = estimate_body_mask(reference_hu)
    out: dict[str, Any] = {
        "metric_reference": "FBP of the noise-free simulated sinogram (same geometry, filter): "
        "separates the quantum noise from the discretisation error of projection + FBP",
        "noise_free_fbp_psnr_db_vs_input": psnr_db(noise_free_hu, reference_hu, mask),
    }
    for name, image in images.items():
        out[f"{name}_psnr_db"] = psnr_db(image, noise_free_hu, mask)
    return {
        key: (v if not isinstance(v, float) or math.isfinite(v) else None) for key, v in out.items()
    }


def _scanner_affine(geometry: Geometry, slice_spacing_mm: float, n_slices: int) -> Any:
    """Index ``(k, j, i)`` -> mm of the scanner frame, volume centred on the rotation axis."""
    p, n = geometry.pixel_size_mm, geometry.image_size
    affine = np.zeros((4, 4))
    affine[0, 2] = affine[1, 1] = p  # columns along x, rows along y
    affine[2, 0] = slice_spacing_mm  # slices along z
    affine[:3, 3] = [-(n - 1) / 2 * p, -(n - 1) / 2 * p, -(n_slices - 1) / 2 * slice_spacing_mm]
    affine[3, 3] = 1.0
    return affine


def run_sinogram(
    sinogram: Sinogram, params: ZeroShotDenoiseParams, progress: ProgressCallback
) -> Result:
    """Flicking-denoise a 360 degree sinogram bundle slice by slice, then FBP.

    Args:
        sinogram: Line integrals ``(S, n_views, n_det)`` with their geometry.
        params: Validated parameters with ``domain="sinogram"``.
        progress: ``callback(fraction, step)``; may raise ``Cancelled``.

    Returns:
        Result with ``volumes["denoised"]`` (FBP of the flicking-denoised data) and
        ``volumes["fbp"]`` (FBP of the data as given), both ``(S, N, N)`` float32 in HU for
        CT (water at ``sinogram.mu_water_per_mm``) or 1/mm otherwise, on the scanner-frame
        grid (pixel ``pixel_size_mm`` in-plane, ``slice_spacing_mm`` between slices, centred
        on the rotation axis); measurements (flicking settings and facts, residuals of both,
        runtimes) and a comparison figure.

    Raises:
        InputRejected: A scan that does not cover 360 degrees, non-finite data, a tiny grid,
            before any fitting.
    """
    cmap = check_sinogram(sinogram)
    started = time.perf_counter()
    progress(0.0, "flicking")
    projector = make_projector(sinogram.geometry, "torch", resolve_device(params.device))
    rec = reconstruct(sinogram, cmap, params, projector, progress)
    ct = sinogram.modality == "CT"
    units = "HU" if ct else "1/mm"

    def convert(mu: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return mu_to_hu(mu, sinogram.mu_water_per_mm) if ct else mu

    images = {"fbp": convert(rec.fbp_mu), "flicking": convert(rec.flicking_mu)}
    elapsed = time.perf_counter() - started
    measurements: dict[str, Any] = {
        "domain": "sinogram",
        "input": "sinogram bundle",
        "simulated": False,
        "geometry": geometry_facts(sinogram.geometry),
        "normalisation": dict(sinogram.meta),
        **rec.facts,
        "units": units,
        "mu_water_per_mm": sinogram.mu_water_per_mm if ct else None,
        "output_frame": SCANNER_FRAME,
        "runtime_seconds": elapsed,
        "seconds_per_slice": elapsed / sinogram.n_slices,
        "shape": list(images["fbp"].shape),
    }
    affine = _scanner_affine(sinogram.geometry, sinogram.slice_spacing_mm, sinogram.n_slices)
    meta = {"frame": SCANNER_FRAME, "source_file": sinogram.meta.get("source_file", "")}
    volumes = {
        "denoised": Volume(
            images["flicking"],
            affine,
            sinogram.modality,
            units,
            meta={**meta, "derived_from": "zeroshot-denoise sinogram flicking + FBP"},
        ),
        "fbp": Volume(
            images["fbp"], affine, sinogram.modality, units, meta={**meta, "derived_from": "FBP"}
        ),
    }
    figure = _comparison_figure(images, units, simulated=False)
    provenance = provenance_for("zeroshot-denoise", params, sinogram)
    progress(1.0, "done")
    return Result(volumes, measurements, [figure], provenance)


def check_simulation_input(image: Volume) -> float:
    """Refuse a volume that cannot be simulated (``ct_simulation.check_ct_volume``); pixel mm."""
    return check_ct_volume(image, "simulate_i0 simulates a CT scan of")


def simulation_geometry(n: int, pixel_mm: float, views: int) -> FanBeamGeometry:
    """360 degree fan beam for an ``n x n`` slice: half fan 30 degrees, magnification 2.

    Source-to-isocentre twice the slice's half diagonal (+1 pixel), source-to-detector twice
    that, curved detector with :data:`DETECTOR_BINS_PER_PIXEL` bins per pixel at the
    isocentre, as many bins as cover the slice.
    """
    reach = (n - 1) * pixel_mm / math.sqrt(2.0) + pixel_mm
    sod = 2.0 * reach
    sdd = 2.0 * sod
    spacing = pixel_mm * (sdd / sod) / DETECTOR_BINS_PER_PIXEL
    return FanBeamGeometry(n, pixel_mm, views, sod, sdd, "equiangular", None, spacing, 360.0)


def simulate_scan(
    image: Volume, params: ZeroShotDenoiseParams, pixel_mm: float
) -> tuple[Sinogram, Projector, npt.NDArray[np.float32], tuple[slice, slice]]:
    """Simulate the low-dose 360 degree fan-beam scan of every slice of a CT volume.

    Args:
        image: CT volume ``(K, H, W)`` in HU (checked by :func:`check_simulation_input`).
        params: ``simulate_i0`` (photons per bin and view), ``simulate_views``, ``seed``.
        pixel_mm: In-plane pixel size (mm).

    Returns:
        ``(sinogram, projector, noise_free_fbp_hu, (rows, cols))``: noisy line integrals
        ``(K, n_views, n_det)`` of the air-padded ``(K, N, N)`` slices, the projector, the FBP
        (``params.filter_name``, HU, ``(K, N, N)``) of the noise-free sinograms (what FBP gives
        without quantum noise) and the index ranges that crop ``N x N`` back to ``(H, W)``.
    """
    assert params.simulate_i0 is not None
    k, h, w = image.shape
    n = max(h, w)
    top, left = (n - h) // 2, (n - w) // 2
    rows, cols = slice(top, top + h), slice(left, left + w)
    padded = np.full((k, n, n), AIR_HU, dtype=np.float32)
    padded[:, rows, cols] = image.array
    geometry = simulation_geometry(n, pixel_mm, params.simulate_views)
    projector = make_projector(geometry, "torch", resolve_device(params.device))
    rng = np.random.default_rng(params.seed)
    data = np.empty((k, *geometry.sinogram_shape), dtype=np.float32)
    noise_free = np.empty((k, n, n), dtype=np.float32)
    for i in range(k):  # one slice at a time: bounded memory, noise drawn in slice order
        clean = projector.forward(hu_to_mu(padded[i]))
        data[i] = noisy_line_integrals(clean, params.simulate_i0, rng)
        noise_free[i] = mu_to_hu(projector.fbp(clean, params.filter_name))
    meta = {
        "simulated": "simulated data (research/QA): a 360 degree fan-beam scan of the input, "
        f"Poisson noise at I0 {params.simulate_i0:g} photons per bin and view, seed "
        f"{params.seed}",
    }
    sinogram = Sinogram(data, geometry, image.spacing[0], "CT", MU_WATER_PER_MM, meta)
    return sinogram, projector, noise_free, (rows, cols)


def run_simulated(
    image: Volume, params: ZeroShotDenoiseParams, progress: ProgressCallback
) -> Result:
    """Simulate a low-dose 360 degree scan of a CT volume, flicking-denoise it, FBP.

    Args:
        image: CT volume ``(K, H, W)`` in HU, square pixels (mm); the ground truth.
        params: Validated parameters with ``domain="sinogram"`` and ``simulate_i0`` set.
        progress: ``callback(fraction, step)``; may raise ``Cancelled``.

    Returns:
        Result with ``volumes["denoised"]`` (FBP of the flicking-denoised simulated data) and
        ``volumes["fbp"]`` (FBP of the simulated noisy data), HU, float32, on the input's grid
        (same affine and frame of reference; ``meta["simulated"]`` says what was simulated);
        measurements as :func:`run_sinogram` plus the simulation settings and PSNR/SSIM of
        both against the input in its body mask (HU window [-1000, 1000]); a
        ``input | fbp | flicking | difference`` figure.

    Raises:
        InputRejected: Non-CT input, NaN, tiny slices or non-square pixels, before any
            projection.
    """
    assert params.simulate_i0 is not None
    pixel_mm = check_simulation_input(image)
    started = time.perf_counter()
    progress(0.0, "simulating the scan")
    sinogram, projector, noise_free, (rows, cols) = simulate_scan(image, params, pixel_mm)
    cmap = check_sinogram(sinogram)
    rec = reconstruct(sinogram, cmap, params, projector, progress, share=(0.05, 1.0))
    reference = np.asarray(image.array, dtype=np.float32)
    images = {
        "fbp": mu_to_hu(rec.fbp_mu)[:, rows, cols],
        "flicking": mu_to_hu(rec.flicking_mu)[:, rows, cols],
    }
    elapsed = time.perf_counter() - started
    k, h, w = image.shape
    measurements: dict[str, Any] = {
        "domain": "sinogram",
        "input": "simulated low-dose scan of the input volume (research/QA mode)",
        "simulated": True,
        "simulation": {
            "i0": params.simulate_i0,
            "views": params.simulate_views,
            "seed": params.seed,
            "noise": "Poisson counts, -log(counts / I0), counts clamped to >= 1",
            "padding_hu": AIR_HU,
        },
        "geometry": geometry_facts(sinogram.geometry),
        **rec.facts,
        **quality_against_input(reference, images),
        "noise_only": _noise_only(noise_free[:, rows, cols], reference, images),
        "units": "HU",
        "runtime_seconds": elapsed,
        "seconds_per_slice": elapsed / k,
        "shape": [k, h, w],
    }
    label = str(sinogram.meta["simulated"])
    figure = _comparison_figure({"input": reference, **images}, "HU", simulated=True)
    volumes = {
        "denoised": image.with_array(
            images["flicking"],
            meta={
                **image.meta,
                "derived_from": "zeroshot-denoise sinogram flicking + FBP",
                "simulated": label,
            },
        ),
        "fbp": image.with_array(
            images["fbp"], meta={**image.meta, "derived_from": "FBP", "simulated": label}
        ),
    }
    provenance = provenance_for("zeroshot-denoise", params, image)
    progress(1.0, "done")
    return Result(volumes, measurements, [figure], provenance)
